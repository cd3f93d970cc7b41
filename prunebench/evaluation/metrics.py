"""Every number prunebench reports, defined once (docs/metrics.md states them for readers).

Tables, results files, studies and plots all call these functions, so one name always means one
quantity:

* **latency**: the *median* over queries of a query's wall time, ms (vision + LLM + action head +
  scoring/pruning overhead). Medians, because one slow query (a page fault, another process)
  should not move a comparison. The per-stage *breakdown* uses means, which add up to the mean
  total (a stacked bar of medians would not).
* **speedup vs dense**: median dense latency / median latency, both measured in the same process
  on the same observations (interleaved), so that machine noise hits both alike.
* **action error vs dense**: mean |a - a_dense| over the chunk's *normalised* actions (the model's
  [-1, 1] output before un-normalisation), averaged over queries. Normalised, so that every action
  dimension weighs alike and the number means the same for every model and suite.
* **LLM FLOPs**: analytic decoder FLOPs per query (prunebench.engine.accounting), mean over queries;
  **FLOPs-ideal speedup** = mean dense FLOPs / mean FLOPs.
* **success rate**: successes / episodes that ended in success or failure; episodes that raised
  an error are counted apart (``errors``) and never as failures. 95 % Wilson score interval.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile (scipy.stats.norm.ppf(0.975))


def latency_ms(ms: Iterable[dict[str, float]], stage: str = "total") -> float:
    """Median over queries of one stage's ms (``total``: the whole query)."""
    values = [m.get(stage, 0.0) for m in ms]
    return float(np.median(values)) if values else float("nan")


def speedup(dense_ms: list[dict[str, float]], ms: list[dict[str, float]],
            stage: str = "total") -> float:
    """Median dense ms / median ms of the same queries (same process, same observations)."""
    return latency_ms(dense_ms, stage) / max(1e-9, latency_ms(ms, stage))


def speedups(dense_ms: list[dict[str, float]], ms: list[dict[str, float]]) -> dict[str, float]:
    """:func:`speedup` of the whole query and of the LLM."""
    return {stage: speedup(dense_ms, ms, stage) for stage in ("total", "llm")}


def action_error(normalized: np.ndarray, dense_normalized: np.ndarray) -> float:
    """Mean |a - a_dense| over one query's chunk of normalised actions."""
    return float(np.abs(np.asarray(normalized, dtype=np.float64) -
                        np.asarray(dense_normalized, dtype=np.float64)).mean())


def flops_ideal_speedup(dense_flops: Iterable[float], flops: Iterable[float]) -> float:
    """Mean dense LLM FLOPs / mean LLM FLOPs: the speedup if time followed FLOPs exactly."""
    return float(np.mean(list(dense_flops)) / max(1e-9, np.mean(list(flops))))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a success rate; (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def success_rate(successes: int, n: int) -> float | None:
    """Successes / episodes with an outcome; None (not 0) when no episode had one."""
    return successes / n if n else None
