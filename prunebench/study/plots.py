"""A study's plots, each saved as PNG and PDF, from its trials table
(:func:`prunebench.study.pareto.trials_table`): the Pareto front per strategy with the dense
baseline, quality vs keep ratio with 95 % confidence bands, speedup per suite, the latency breakdown
of the front's representatives and hypervolume vs trials. The drawing shared with results files
(``prunebench report``) -- fronts, latency breakdown, kept-token plots -- is in
:mod:`prunebench.evaluation.figures`.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from prunebench.evaluation import figures  # noqa: E402
from prunebench.evaluation.figures import LABELS, save  # noqa: E402
from prunebench.plugins.dense import DENSE  # noqa: E402
from prunebench.study.definition import OBJECTIVES  # noqa: E402

_palette = figures.palette
# the generic drawing, under the names `prunebench plot` has always used
latency_breakdown, kept_per_layer = figures.latency_breakdown, figures.kept_per_layer
kept_token_heatmap, kept_patch_overlay = figures.kept_token_heatmap, figures.kept_patch_overlay


def _axes(objectives: list[str]) -> tuple[str, str]:
    """(x, y) of a front plot: the first cost objective on x, the first quality objective on y."""
    costs = [o for o in objectives if OBJECTIVES[o][0] == "minimize"]
    gains = [o for o in objectives if OBJECTIVES[o][0] == "maximize"]
    if gains and costs:
        return costs[0], gains[0]
    return (objectives[1] if len(objectives) > 1 else "latency_ms"), objectives[0]


# --------------------------------------------------------------------------- study plots
def pareto_front(df: pd.DataFrame, objectives: list[str], stem: Path, title: str = "") -> list[Path]:
    """All trials (dominated ones faint), each strategy's front as a step line, the combined front
    dashed, the dense baseline as a star; error bars and filled/hollow markers when the table has
    the columns :mod:`prunebench.evaluation.figures` describes."""
    x, y = _axes(objectives)
    return figures.pareto_front(df, x, y, stem, title)


def _episode_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per closed-loop episode of every trial (success 0/1), with the trial's keep ratio."""
    rows = []
    for _, trial in df[df["duplicate_of"].isna()].iterrows():
        data = json.loads(Path(trial["results"]).read_text()) if trial["results"] else {}
        for episode in data.get("episodes", []):
            rows.append({"strategy": trial["strategy"], "keep_ratio": trial["keep_ratio"],
                         "success": float(episode["success"])})
    return pd.DataFrame(rows)


def quality_vs_keep_ratio(df: pd.DataFrame, stem: Path, bins: int = 10) -> list[Path]:
    """Success rate (closed loop, per episode) or action error (replay) vs the kept fraction of
    visual tokens, binned, with bootstrapped 95 % confidence bands; the dense baseline at 1.0."""
    episodes = _episode_rows(df) if df["success_rate"].notna().any() else pd.DataFrame()
    data, y = (episodes, "success") if not episodes.empty else (df, "action_error")
    data = data.assign(keep_ratio=(np.ceil(data["keep_ratio"] * bins) / bins).clip(1 / bins, 1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=data[data["strategy"] != DENSE], x="keep_ratio", y=y, hue="strategy",
                 palette=_palette(data["strategy"]), errorbar=("ci", 95), marker="o", ax=ax)
    dense = data[data["strategy"] == DENSE][y]
    if len(dense):
        ax.axhline(dense.mean(), color="black", ls=":", label="dense")
    ax.set(xlabel=f"{LABELS['keep_ratio']}, bins of {1 / bins:g}",
           ylabel="success rate" if y == "success" else LABELS[y], xlim=(0, 1.05),
           title=f"{'Success rate' if y == 'success' else 'Action error'} vs keep ratio (95 % CI)")
    ax.legend(fontsize=8)
    return save(fig, stem)


def _suite_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Speedup per suite of every front trial (closed-loop results files)."""
    rows = []
    for _, trial in df[df["front"] & ~df["dense"]].iterrows():
        data = json.loads(Path(trial["results"]).read_text()) if trial["results"] else {}
        for suite, group in (data.get("per_suite") or {}).items():
            if group.get("speedup_vs_dense"):
                rows.append({"strategy": trial["strategy"], "suite": suite,
                             "speedup": group["speedup_vs_dense"]["total"]})
        if not data.get("per_suite"):
            rows.append({"strategy": trial["strategy"], "suite": "stream", "speedup": trial["speedup"]})
    return pd.DataFrame(rows)


def speedup_per_suite(df: pd.DataFrame, stem: Path) -> list[Path]:
    rows = _suite_rows(df)
    fig, ax = plt.subplots(figsize=(7, 4))
    if not rows.empty:
        sns.barplot(data=rows, x="suite", y="speedup", hue="strategy", palette=_palette(rows["strategy"]),
                    errorbar="sd", ax=ax)
    ax.axhline(1.0, color="black", ls=":", lw=1)
    ax.set(ylabel=LABELS["speedup"], title="Speedup vs dense per suite (front trials; bars: mean, whiskers: sd)")
    return save(fig, stem)


def front_representatives(df: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """Per strategy, the front trial with the best quality objective (the dense baseline first)."""
    _, y = _axes(objectives)
    ascending = OBJECTIVES[y][0] == "minimize"
    picks = [df[df["dense"]].head(1)]
    for _, group in df[df["front"] & ~df["dense"]].groupby("strategy"):
        picks.append(group.sort_values(y, ascending=ascending).head(1))
    out = pd.concat(picks)
    return out.assign(label=[f"{s} #{t}" if s != DENSE else "dense" for s, t in zip(out["strategy"], out["trial"])])


def hypervolume_vs_trials(hv: pd.DataFrame, stem: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4))
    palette = {**_palette(hv["strategy"]), "combined": (0, 0, 0)}
    sns.lineplot(data=hv, x="trials", y="hypervolume", hue="strategy", palette=palette, ax=ax)
    ax.set(xlabel="complete trials", ylabel="hypervolume (common reference point)",
           title="Search quality: hypervolume vs trials")
    return save(fig, stem)
