"""Comparison plots (seaborn), each saved as PNG and PDF.

From a study's trials table (:func:`prunebench.study.pareto.trials_table`): the Pareto front per strategy
with the dense baseline, quality vs keep ratio with 95 % confidence bands, speedup per suite,
the latency breakdown and hypervolume vs trials. From a strategy run on an observation stream: the
per-layer kept-token heatmap and the kept-patch overlay on the camera frames.
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

from prunebench.plugins.dense import DENSE  # noqa: E402
from prunebench.study.definition import OBJECTIVES  # noqa: E402

LABELS = {"success_rate": "success rate", "latency_ms": "mean query latency (ms)",
          "speedup": "speedup vs dense (x)", "action_error": "action error vs dense (L1)",
          "gflops": "LLM GFLOPs per query", "keep_ratio": "visual tokens kept (fraction)"}
STAGES = ("vision", "llm", "head", "overhead")  # the latency breakdown, bottom to top


def save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def _palette(strategies) -> dict:
    names = sorted(s for s in set(strategies) if s != DENSE)
    return dict(zip(names, sns.color_palette("colorblind", len(names))))


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
    dashed, the dense baseline as a star."""
    x, y = _axes(objectives)
    colours = _palette(df["strategy"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    searched = df[~df["dense"]]
    sns.scatterplot(data=searched[~searched["front"]], x=x, y=y, hue="strategy", palette=colours,
                    alpha=0.25, legend=False, ax=ax)
    sns.scatterplot(data=searched[searched["front"]], x=x, y=y, hue="strategy", palette=colours,
                    s=50, ax=ax)
    for strategy, group in searched[searched["front"]].groupby("strategy"):
        group = group.sort_values(x)
        ax.plot(group[x], group[y], drawstyle="steps-post", color=colours[strategy], lw=1.2)
    combined = df[df["combined_front"]].sort_values(x)
    ax.plot(combined[x], combined[y], drawstyle="steps-post", color="black", ls="--", lw=1,
            label="combined front")
    dense = df[df["dense"]]
    ax.scatter(dense[x], dense[y], marker="*", s=250, color="gold", edgecolor="black", zorder=5,
               label="dense baseline")
    ax.set(xlabel=LABELS.get(x, x), ylabel=LABELS.get(y, y),
           title=title or f"Pareto front: {LABELS.get(y, y)} vs {LABELS.get(x, x)}")
    ax.legend(fontsize=8)
    return save(fig, stem)


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


def latency_breakdown(rows: pd.DataFrame, stem: Path) -> list[Path]:
    """Stacked bars of mean ms per stage (vision / LLM / head / pruning overhead), one per row
    (``label`` column; ``ms_<stage>`` columns)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(rows))
    for stage, colour in zip(STAGES, sns.color_palette("pastel", len(STAGES))):
        values = rows.get(f"ms_{stage}", pd.Series(0.0, index=rows.index)).fillna(0).to_numpy()
        ax.bar(rows["label"], values, bottom=bottom, label=stage, color=colour, edgecolor="grey")
        bottom += values
    ax.set(ylabel="mean ms per query", title="Latency breakdown (scoring and pruning = overhead)")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)
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


# --------------------------------------------------------------------------- token plots
def kept_per_layer(results, layout, n_layers: int) -> np.ndarray:
    """Fraction of queries in which each visual token is present at each layer: (n_layers, n_visual).
    Needs an engine run with ``record_kept=True``."""
    present = np.zeros((n_layers, layout.n_visual))
    for result in results:
        alive = np.ones(layout.n_visual, bool)
        for layer in range(n_layers):
            where = "before_llm" if layer == 0 else f"after_layer_{layer - 1}"
            if where in result.kept:
                alive = np.zeros(layout.n_visual, bool)
                alive[result.kept[where].numpy()] = True
            present[layer] += alive
    return present / max(1, len(results))


def kept_token_heatmap(present: np.ndarray, stem: Path, title: str) -> list[Path]:
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(present) + 1.8))
    sns.heatmap(present, vmin=0, vmax=1, cmap="viridis", ax=ax,
                cbar_kws={"label": "fraction of queries kept"})
    ax.set(xlabel="visual token index (views in order, row-major patches)", ylabel="LLM layer", title=title)
    ax.set_xticks(np.arange(0, present.shape[1], 16) + 0.5, np.arange(0, present.shape[1], 16))
    return save(fig, stem)


def kept_patch_overlay(images: dict[str, np.ndarray], kept: np.ndarray, layout, stem: Path,
                       title: str) -> list[Path]:
    """Each camera frame with the removed patches darkened (``kept``: visual indices kept)."""
    views = list(images)
    fig, axes = plt.subplots(1, len(views), figsize=(4 * len(views), 4.3))
    axes = np.atleast_1d(axes)
    keep = np.zeros(layout.n_visual, bool)
    keep[kept] = True
    for v, (ax, view) in enumerate(zip(axes, views)):
        image = images[view].astype(float) / 255
        span = layout.views[v]
        mask = keep[list(layout.visual_range(v))].reshape(span.rows, span.cols)
        rows = np.arange(image.shape[0]) * span.rows // image.shape[0]  # patch row of each pixel row
        cols = np.arange(image.shape[1]) * span.cols // image.shape[1]
        scale = mask[rows][:, cols].astype(float)
        ax.imshow(image * (0.25 + 0.75 * scale[..., None]))
        ax.set(title=f"{view}: {mask.sum()}/{mask.size} patches kept", xticks=[], yticks=[])
    fig.suptitle(title)
    return save(fig, stem)
