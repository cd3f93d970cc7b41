"""Side-by-side comparison of strategies against the dense baseline (the README's main job)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from prunebench.engine.loop import QueryResult
from prunebench.evaluation import contention, metrics, paired
from prunebench.evaluation.contention import Contention
from prunebench.evaluation.results import EvalResults, GroupResult
from prunebench.plugins.dense import DENSE


class ComparisonRow(BaseModel):
    """One strategy on a stream next to the dense baseline; definitions in prunebench.evaluation.metrics."""

    strategy: str
    mean_visual_tokens: float
    query_ms: float | None  # metrics.latency_ms
    llm_ms: float
    overhead_ms: float
    speedup_total: float  # metrics.speedup
    speedup_ci95: str = "-"  # bootstrap over paired queries (paired.query_speedup_interval)
    speedup_llm: float
    flops_ideal_speedup: float  # metrics.flops_ideal_speedup
    action_error_vs_dense: float  # metrics.action_error, mean over queries
    contention: Contention | None = None  # this strategy's queries and the run's load samples
    contended: bool | None = None  # contention.contended: its latency was measured on a busy machine


def compare_rows(results: dict[str, list[QueryResult]], dense: str = DENSE, load_avg=(),
                 device: str = "cpu") -> list[ComparisonRow]:
    """``load_avg``: the run's load-average samples (start and end), for the contention verdict."""
    base = results[dense]
    base_ms = [r.record.ms for r in base]
    rows = []
    for name, rs in results.items():
        ms = [r.record.ms for r in rs]
        rows.append(ComparisonRow(
            strategy=name,
            mean_visual_tokens=float(np.mean([np.mean(r.record.visual_per_layer) for r in rs])),
            query_ms=metrics.latency_ms(ms), llm_ms=metrics.latency_ms(ms, "llm"),
            overhead_ms=metrics.latency_ms(ms, "overhead"),
            speedup_total=metrics.speedup(base_ms, ms), speedup_llm=metrics.speedup(base_ms, ms, "llm"),
            speedup_ci95=_interval(paired.query_speedup_interval(base_ms, ms), 1, "{:.2f}") if name != dense else "-",
            flops_ideal_speedup=metrics.flops_ideal_speedup([r.record.llm_flops for r in base],
                                                            [r.record.llm_flops for r in rs]),
            action_error_vs_dense=float(np.mean([metrics.action_error(r.normalized, b.normalized)
                                                 for r, b in zip(rs, base)])),
        ))
        rows[-1].contention = contention.of_records([r.record for r in rs], load_avg, device=device)
        rows[-1].contended = rows[-1].contention.contended
    return rows


def _cell(value, spec: str) -> str:
    """One cell; a value not measured (None or NaN, e.g. no episode had an outcome) is '-'."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (key, header, format spec)."""
    cells = [[_cell(row.get(k), f) for k, _, f in columns] for row in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


COMPARISON_COLUMNS = [
    ("strategy", "strategy", ""), ("mean_visual_tokens", "visual tok", ".1f"),
    ("query_ms", "query ms", ".2f"), ("llm_ms", "LLM ms", ".2f"),
    ("overhead_ms", "overhead ms", ".2f"), ("speedup_total", "speedup", ".2f"),
    ("speedup_ci95", "speedup 95% CI", ""), ("speedup_llm", "LLM speedup", ".2f"),
    ("flops_ideal_speedup", "FLOPs-ideal", ".2f"),
    ("action_error_vs_dense", "action error vs dense", ".4f"), ("contended", "contended", ""),
]


# --------------------------------------------------------------------------- closed loop
class ClosedLoopRow(BaseModel):
    """One strategy's closed-loop LIBERO result next to the others (same episodes, same policy)."""

    strategy: str
    episodes: int
    errors: int
    success_rate: float | None
    success_ci95: str
    query_ms: float | None  # metrics.latency_ms
    dense_query_ms: float | None  # the dense forwards paired with those queries, same run
    speedup_vs_dense: float | None  # metrics.speedup: dense_query_ms / query_ms
    mean_visual_tokens: float | None
    llm_gflops: float | None
    contended: bool | None = None  # its latency was measured on a busy machine (prunebench.evaluation.contention)
    # paired with dense's episodes (prunebench.evaluation.paired); None/"-" for dense or without a dense run
    success_diff: float | None = None  # points: success rate minus dense's, over the paired episodes
    success_diff_ci95: str = "-"  # Newcombe's interval, points
    p_holm: float | None = None  # McNemar exact test, Holm-adjusted over the strategies
    not_worse: bool | None = None  # the interval's lower bound above -delta
    speedup_ci95: str = "-"  # bootstrap over episodes
    results_file: str


def group_cells(group: GroupResult) -> dict:
    """The table cells of a group of episodes (a task, a suite, a run), shared by every table."""
    q = group.queries
    lo, hi = group.success_ci95
    return {"episodes": group.n_episodes, "errors": group.n_errors, "success_rate": group.success_rate,
            "success_ci95": f"[{lo:.2f}, {hi:.2f}]" if group.n_episodes else "-",
            "mean_steps": group.mean_steps,
            "query_ms": q.latency_ms["total"].median if q else None,
            "dense_query_ms": group.dense_query_ms,
            "speedup_vs_dense": group.speedup_vs_dense["total"] if group.speedup_vs_dense else None,
            "mean_visual_tokens": q.mean_visual_tokens if q else None,
            "llm_gflops": q.mean_llm_flops / 1e9 if q else None,
            "contended": group.contention.contended if group.contention else None}


def closed_loop_rows(results: dict[str, EvalResults], files: dict[str, str],
                     delta: float = paired.DELTA) -> list[ClosedLoopRow]:
    """One row per run; each strategy's success paired with dense's episodes when a dense run is there."""
    diffs = (paired.compare_to_baseline({name: res.episodes for name, res in results.items()}, DENSE, delta)
             if DENSE in results else {})
    rows = []
    for name, res in results.items():
        if res.overall is None:
            continue
        cells = {k: v for k, v in group_cells(res.overall).items() if k in ClosedLoopRow.model_fields}
        if name == DENSE:  # the reference itself
            cells.update(speedup_vs_dense=1.0, dense_query_ms=cells["query_ms"])
        else:
            cells.update(speedup_ci95=_interval(paired.speedup_interval(res.episodes), 1, "{:.2f}"))
        if name in diffs and diffs[name].n_pairs:
            d = diffs[name]
            cells.update(success_diff=100 * d.difference, success_diff_ci95=_interval(d.ci95, 100, "{:+.1f}"),
                         p_holm=d.p_holm, not_worse=d.not_worse)
        rows.append(ClosedLoopRow(strategy=name, results_file=files[name], **cells))
    return rows


def _interval(bounds: tuple[float, float] | None, scale: float, spec: str) -> str:
    if bounds is None or any(np.isnan(b) for b in bounds):  # not measured (too few episodes or queries)
        return "-"
    return "[" + ", ".join(spec.format(scale * b) for b in bounds) + "]"


CLOSED_LOOP_COLUMNS = [
    ("strategy", "strategy", ""), ("episodes", "episodes", "d"), ("errors", "errors", "d"),
    ("success_rate", "success", ".2f"), ("success_ci95", "95% CI", ""), ("query_ms", "query ms", ".2f"),
    ("dense_query_ms", "dense ms", ".2f"), ("speedup_vs_dense", "speedup vs dense", ".2f"),
    ("speedup_ci95", "speedup 95% CI", ""), ("mean_visual_tokens", "visual tok", ".1f"),
    ("llm_gflops", "LLM GFLOPs", ".3f"), ("success_diff", "Δ vs dense", "+.1f"),
    ("success_diff_ci95", "Δ 95% CI", ""), ("p_holm", "p (Holm)", ".3f"),
    # the header names the default margin, the one closed_loop_rows uses unless given another
    ("not_worse", f"not worse (δ {100 * paired.DELTA:g} pts)", ""), ("contended", "contended", ""),
]
