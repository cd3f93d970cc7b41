"""Side-by-side comparison of strategies against the dense baseline (the README's main job)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from prunebench.engine import QueryResult
from prunebench.results import EvalResults, GroupResult


class ComparisonRow(BaseModel):
    strategy: str
    mean_visual_tokens: float
    total_ms_median: float
    llm_ms_median: float
    overhead_ms_median: float
    speedup_total: float  # dense median total / this median total
    speedup_llm: float
    flops_ideal_speedup: float  # dense LLM FLOPs / this LLM FLOPs
    action_l1_vs_dense: float  # mean |a - a_dense| on normalised actions


def compare_rows(results: dict[str, list[QueryResult]], dense: str = "none") -> list[ComparisonRow]:
    base = results[dense]
    med = lambda rs, key: float(np.median([r.record.ms[key] for r in rs]))
    base_total, base_llm = med(base, "total"), med(base, "llm")
    base_flops = float(np.mean([r.record.llm_flops for r in base]))
    rows = []
    for name, rs in results.items():
        rows.append(ComparisonRow(
            strategy=name,
            mean_visual_tokens=float(np.mean([np.mean(r.record.visual_per_layer) for r in rs])),
            total_ms_median=med(rs, "total"), llm_ms_median=med(rs, "llm"),
            overhead_ms_median=med(rs, "overhead"),
            speedup_total=base_total / med(rs, "total"), speedup_llm=base_llm / med(rs, "llm"),
            flops_ideal_speedup=base_flops / float(np.mean([r.record.llm_flops for r in rs])),
            action_l1_vs_dense=float(np.mean([np.abs(r.normalized - b.normalized).mean()
                                              for r, b in zip(rs, base)])),
        ))
    return rows


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (key, header, format spec)."""
    cells = [[format(row[k], f) if isinstance(row[k], (int, float)) else str(row[k])
              for k, _, f in columns] for row in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


COMPARISON_COLUMNS = [
    ("strategy", "strategy", ""), ("mean_visual_tokens", "visual tok", ".1f"),
    ("total_ms_median", "query ms", ".2f"), ("llm_ms_median", "LLM ms", ".2f"),
    ("overhead_ms_median", "overhead ms", ".2f"), ("speedup_total", "speedup", ".2f"),
    ("speedup_llm", "LLM speedup", ".2f"), ("flops_ideal_speedup", "FLOPs-ideal", ".2f"),
    ("action_l1_vs_dense", "action L1 vs dense", ".4f"),
]


# --------------------------------------------------------------------------- closed loop
class ClosedLoopRow(BaseModel):
    """One strategy's closed-loop LIBERO result next to the others (same episodes, same policy)."""

    strategy: str
    episodes: int
    success_rate: float
    success_ci95: str
    mean_query_ms: float
    speedup_vs_dense: float  # same-run dense reference: median dense ms / median ms
    mean_visual_tokens: float
    llm_gflops: float
    results_file: str


def group_cells(group: GroupResult) -> dict:
    """The table cells of a group of episodes (a task, a suite, a run), shared by every table."""
    q = group.queries
    lo, hi = group.success_ci95
    nan = float("nan")
    return {"episodes": group.n_episodes, "success_rate": group.success_rate,
            "success_ci95": f"[{lo:.2f}, {hi:.2f}]", "mean_steps": group.mean_steps,
            "median_query_ms": q.latency_ms["total"].median if q else nan,
            "mean_query_ms": q.latency_ms["total"].mean if q else nan,
            "speedup_vs_dense": group.speedup_vs_dense["total"] if group.speedup_vs_dense else 1.0,
            "mean_visual_tokens": q.mean_visual_tokens if q else nan,
            "llm_gflops": q.mean_llm_flops / 1e9 if q else nan}


def closed_loop_rows(results: dict[str, EvalResults], files: dict[str, str]) -> list[ClosedLoopRow]:
    fields = ClosedLoopRow.model_fields
    return [ClosedLoopRow(strategy=name, results_file=files[name],
                          **{k: v for k, v in group_cells(res.overall).items() if k in fields})
            for name, res in results.items()]


CLOSED_LOOP_COLUMNS = [
    ("strategy", "strategy", ""), ("episodes", "episodes", "d"), ("success_rate", "success", ".2f"),
    ("success_ci95", "95% CI", ""), ("mean_query_ms", "mean query ms", ".2f"),
    ("speedup_vs_dense", "speedup vs dense", ".2f"), ("mean_visual_tokens", "visual tok", ".1f"),
    ("llm_gflops", "LLM GFLOPs", ".3f"),
]
