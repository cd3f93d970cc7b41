"""Figures (matplotlib and seaborn), each saved as PNG and PDF, drawn from plain DataFrames so that a
study's trials table (prunebench.study.plots) and merged results files (``prunebench report``)
share them: the Pareto front with error bars, success vs keep ratio, the latency breakdown, a
strategy x task heat map, and the kept tokens of a strategy on an observation stream (per-layer heat
map, kept patches on the camera frames).

Error bars and markers: a front row may carry ``success_lo``/``success_hi`` (95 % Wilson interval of
its success rate), ``latency_lo``/``latency_hi`` (p10-p90 of its query latency) and
``distinguishable`` (its paired test against dense is significant after Holm's correction: a
black ring; not distinguishable: hollow; not tested, None: a plain marker).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from prunebench.plugins.dense import DENSE  # noqa: E402

LABELS = {"success_rate": "success rate", "latency_ms": "median query latency (ms)",
          "speedup": "speedup vs dense (x)", "action_error": "action error vs dense (L1)",
          "gflops": "LLM GFLOPs per query", "keep_ratio": "visual tokens kept (fraction)"}
STAGES = ("vision", "llm", "head", "overhead")  # the latency breakdown, bottom to top
ERROR_BARS = {"success_rate": "success", "latency_ms": "latency"}  # axis -> <prefix>_lo / <prefix>_hi


def save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def palette(strategies) -> dict:
    names = sorted(s for s in set(strategies) if s != DENSE)
    return dict(zip(names, sns.color_palette("colorblind", len(names))))


def _spread(df: pd.DataFrame, axis: str):
    """Asymmetric error bars (2, n) around ``df[axis]``, or None when the columns are absent."""
    prefix = ERROR_BARS.get(axis)
    lo, hi = f"{prefix}_lo", f"{prefix}_hi"
    if prefix is None or lo not in df or hi not in df:
        return None
    centre = df[axis].to_numpy(float)
    return np.vstack([centre - df[lo].to_numpy(float), df[hi].to_numpy(float) - centre]).clip(min=0)


def pareto_front(df: pd.DataFrame, x: str, y: str, stem: Path, title: str = "",
                 xlabel: str | None = None, ylabel: str | None = None) -> list[Path]:
    """All rows (dominated ones faint), each strategy's front (``front``) as a step line, the combined
    front (``combined_front``) dashed, the dense baseline (``dense``) as a star; error bars and
    filled/hollow markers where the columns described in the module docstring are present."""
    colours = palette(df["strategy"])
    marked = "distinguishable" in df
    fig, ax = plt.subplots(figsize=(7, 4.5))
    searched = df[~df["dense"]]
    for strategy, group in searched.groupby("strategy"):
        colour, named = colours[strategy], False
        for on_front, part in group.groupby(group["front"].astype(bool)):
            err = dict(xerr=_spread(part, x), yerr=_spread(part, y))
            alpha, size = (1.0, 50) if on_front else (0.25, 20)
            if err["xerr"] is not None or err["yerr"] is not None:
                ax.errorbar(part[x], part[y], fmt="none", ecolor=colour, alpha=0.6 * alpha, lw=1, capsize=2, **err)
            # tested against dense: True (differs: black ring), False (hollow); untested (None): plain
            tested = part["distinguishable"] if marked else pd.Series(None, part.index, dtype=object)
            verdict = tested.map(lambda v: "untested" if v is None or v != v else ("differs" if v else "same"))
            for kind, points in part.groupby(verdict):
                ax.scatter(points[x], points[y], s=size, alpha=alpha, linewidths=1.6 if kind == "differs" else 1.2,
                           edgecolor="black" if kind == "differs" else colour,
                           facecolor="none" if kind == "same" else colour, label=None if named else strategy)
                named = True
        front = group[group["front"].astype(bool)].sort_values(x)
        ax.plot(front[x], front[y], drawstyle="steps-post", color=colour, lw=1.2)
    if "combined_front" in df:
        combined = df[df["combined_front"].astype(bool)].sort_values(x)
        ax.plot(combined[x], combined[y], drawstyle="steps-post", color="black", ls="--", lw=1,
                label="combined front")
    dense = df[df["dense"]]
    if len(dense):
        err = dict(xerr=_spread(dense, x), yerr=_spread(dense, y))
        if err["xerr"] is not None or err["yerr"] is not None:
            ax.errorbar(dense[x], dense[y], fmt="none", ecolor="black", lw=1, capsize=2, **err)
    ax.scatter(dense[x], dense[y], marker="*", s=250, color="gold", edgecolor="black", zorder=5,
               label="dense baseline")
    if marked:  # the legend of the marker fill
        ax.scatter([], [], s=50, facecolor="grey", edgecolor="black", linewidths=1.6,
                   label="differs from dense (paired, Holm)")
        ax.scatter([], [], s=50, facecolor="none", edgecolor="grey", label="not distinguishable from dense")
    xlabel, ylabel = xlabel or LABELS.get(x, x), ylabel or LABELS.get(y, y)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or f"Pareto front: {ylabel} vs {xlabel}")
    ax.legend(fontsize=8)
    return save(fig, stem)


def success_vs_keep_ratio(df: pd.DataFrame, stem: Path, title: str = "") -> list[Path]:
    """One point per config (``keep_ratio``, ``success_rate``) with its Wilson interval
    (``success_lo``/``success_hi``), a line per strategy, the dense baseline as a dotted level."""
    colours = palette(df["strategy"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, group in df[~df["dense"]].groupby("strategy"):
        group = group.sort_values("keep_ratio")
        ax.errorbar(group["keep_ratio"], group["success_rate"], yerr=_spread(group, "success_rate"),
                    color=colours[strategy], marker="o", capsize=3, lw=1.2, label=strategy)
    dense = df[df["dense"]]
    if len(dense):
        level = float(dense["success_rate"].iloc[0])
        ax.axhline(level, color="black", ls=":", label="dense")
        if "success_lo" in dense:
            ax.axhspan(float(dense["success_lo"].iloc[0]), float(dense["success_hi"].iloc[0]),
                       color="grey", alpha=0.12, lw=0)
    ax.set(xlabel=LABELS["keep_ratio"], ylabel="success rate", xlim=(0, 1.05), ylim=(-0.03, 1.03),
           title=title or "Success rate vs keep ratio (95 % Wilson intervals)")
    ax.legend(fontsize=8)
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


def task_heatmap(table: pd.DataFrame, stem: Path, title: str = "Success rate per task") -> list[Path]:
    """Rows (strategies) x columns (tasks) of success rates, annotated; a missing cell stays blank."""
    fig, ax = plt.subplots(figsize=(1.0 * table.shape[1] + 3, 0.5 * table.shape[0] + 1.8))
    sns.heatmap(table.astype(float), vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f", ax=ax,
                cbar_kws={"label": "success rate"})
    ax.set(xlabel="task", ylabel="strategy", title=title)
    ax.tick_params(axis="x", rotation=30)
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


def token_plots(model, configs: list[tuple[str, str, str, dict]], items: list, out: Path, seed: int,
                source: str) -> list[Path]:
    """For each (file stem, title label, strategy name, config): its kept-token heat map over ``items``
    (stream queries, read once) and the patches it kept at the last removal of the last query, drawn
    on that query's frames. The engine records the kept sets (``record_kept=True``)."""
    from prunebench.engine.loop import PruningEngine
    from prunebench.evaluation.runner import run_stream
    from prunebench.plugins.manager import MANAGER

    engine = PruningEngine(model, record_kept=True)
    layout = model.encode(items[0].observation).layout
    last = len(items) - 1
    written = []
    for stem, label, name, config in configs:
        results = run_stream(engine, MANAGER.create(name, config), items, seed=seed)
        written += kept_token_heatmap(kept_per_layer(results, layout, model.n_layers), out / f"kept_tokens_{stem}",
                                      f"{label}: visual tokens present per layer ({source})")
        removals = list(results[last].kept.values())  # kept sets in stage order
        kept = removals[-1].numpy() if removals else list(range(layout.n_visual))
        written += kept_patch_overlay(items[last].observation.images, kept, layout, out / f"kept_patches_{stem}",
                                      f"{label}: patches kept at the last removal, query {last}")
    return written


def file_stem(label: str) -> str:
    """A label as a file-name part: ``fastv[keep_ratio=0.25]`` -> ``fastv_keep_ratio=0.25``."""
    return "_".join(filter(None, "".join(c if c.isalnum() or c in ".=-" else "_" for c in label).split("_")))
