"""Was the machine busy while latency was measured? Torch threads, the evidence, and one rule.

Query latency on a shared machine is fragile: a one-process run measured 12.5 ms per query on a
quiet 2-core machine and 709 ms while another job loaded both cores. Every latency figure in a
results file therefore comes with the evidence that tells the two apart, and a verdict:

* per query, ``cpu_ms``: the CPU time of the thread that ran the query (``time.thread_time``),
  next to its wall time ``ms["total"]`` (two clock reads per query, in ``StageTimer``);
* the 1-minute load average (``os.getloadavg``) at the start and end of each run or episode, next
  to the cores this process may use.

The rule (:func:`judge`) -- contended when either holds:

1. the median over queries of CPU time / wall time of the querying thread is below
   ``CPU_SHARE_MIN`` = 0.8 (only when the model runs on the CPU). On an idle machine the thread
   that runs a query computes, or spins at torch's parallel-region barriers, for the whole query,
   so its CPU time equals its wall time whatever the torch thread count (measured 0.99-1.00 with 1
   and 2 threads on the 2-core reference machine); a CPU-bound competitor makes it wait for a core
   (0.3-0.56 measured with another job on the cores). The querying thread, not the process, is
   measured because a process with 2 threads still reads 1.0 CPU/wall while it gets half of each
   core. Below 0.8: the query waited for a CPU more than a fifth of its time.
2. the load average exceeds ``LOAD_PER_CORE`` = 1.5 x the cores, at a run's or episode's start
   or end, and (on the CPU) at least ``LOW_QUERIES_MIN`` = 10 % of the queries ran below
   ``CPU_SHARE_MIN``. The load average counts this run's own processes and threads (2 workers
   that render every step read 3.3 on 2 cores with every query at CPU/wall 1.00) and lags by about
   a minute, so it counts only where queries show the wait; it catches contention that hit fewer
   than half of the queries, which the median does not. On a GPU it counts alone.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field

CPU_SHARE_MIN = 0.8
LOAD_PER_CORE = 1.5
LOW_QUERIES_MIN = 0.1
NOTE = (f"contended = latency measured on a busy machine: querying thread's median CPU/wall < "
        f"{CPU_SHARE_MIN}, or load average > {LOAD_PER_CORE} x cores with queries that waited "
        "(docs/evaluation.md); "
        "rerun it on a quiet machine before comparing its times")


def cores_available() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(processes: int = 1) -> int:
    """Torch threads per process when none are given: the cores shared by the measuring processes."""
    return max(1, cores_available() // max(1, processes))


def set_threads(threads: int | None = None, processes: int = 1) -> int:
    """Set this process's torch thread count (``threads``, else :func:`default_threads`) and return
    the count torch reports back."""
    import torch

    torch.set_num_threads(threads or default_threads(processes))
    return torch.get_num_threads()


def load_average() -> float | None:
    """The 1-minute load average, None where the OS has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


class Contention(BaseModel):
    """The evidence of contention behind a set of latency figures, and the verdict."""

    contended: bool
    reasons: list[str] = Field(default_factory=list)  # why contended (empty when not)
    # median over queries of the querying thread's CPU time / the query's wall time
    cpu_share_median: float | None = None
    cpu_share_low: float | None = None  # fraction of queries below CPU_SHARE_MIN
    n_queries: int = 0
    load_avg: list[float] = Field(default_factory=list)  # 1-minute load averages sampled
    cores: int
    device: str = "cpu"

    @property
    def mark(self) -> str:
        return "yes" if self.contended else "no"


def judge(cpu_ms: Sequence[float | None], wall_ms: Sequence[float], load_avg: Iterable[float | None],
          cores: int | None = None, device: str = "cpu") -> Contention:
    """The one contention rule (see the module docstring) over paired per-query CPU and wall times
    and load-average samples."""
    cores = cores or cores_available()
    pairs = [(c, w) for c, w in zip(cpu_ms, wall_ms) if c is not None and w and w > 0]
    shares = np.array([c / w for c, w in pairs], dtype=float)
    loads = [float(v) for v in load_avg if v is not None]
    median = float(np.median(shares)) if shares.size else None
    reasons = []
    if median is not None and str(device).startswith("cpu") and median < CPU_SHARE_MIN:
        reasons.append(f"querying thread's median CPU/wall {median:.2f} < {CPU_SHARE_MIN}")
    low = float((shares < CPU_SHARE_MIN).mean()) if shares.size else None
    on_cpu = str(device).startswith("cpu")
    if loads and max(loads) > LOAD_PER_CORE * cores and (not on_cpu or low is None or low >= LOW_QUERIES_MIN):
        reasons.append(f"load average {max(loads):.2f} > {LOAD_PER_CORE} x {cores} cores"
                       + (f" with {low:.0%} of queries below CPU/wall {CPU_SHARE_MIN}" if on_cpu and low else ""))
    return Contention(contended=bool(reasons), reasons=reasons, cpu_share_median=median,
                      cpu_share_low=low,
                      n_queries=int(shares.size), load_avg=loads, cores=cores, device=str(device))


def of_records(records, load_avg: Iterable[float | None], cores: int | None = None,
               device: str = "cpu") -> Contention:
    """:func:`judge` over query records (``cpu_ms`` and ``ms["total"]``)."""
    records = list(records)
    return judge([getattr(r, "cpu_ms", None) for r in records], [r.ms.get("total", 0.0) for r in records],
                 load_avg, cores, device)


def summary_line(contention: Contention | None) -> str:
    """One line for after a run's summary: the verdict, each piece of evidence and its threshold."""
    if contention is None:
        return "contention: not recorded"
    share = "n/a" if contention.cpu_share_median is None else f"{contention.cpu_share_median:.2f}"
    loads = " -> ".join(f"{v:.2f}" for v in contention.load_avg) or "n/a"
    return (f"contention: {'CONTENDED' if contention.contended else 'quiet'}: querying thread's median "
            f"CPU/wall {share} (contended below {CPU_SHARE_MIN}), load average {loads} on {contention.cores} "
            f"cores (contended above {LOAD_PER_CORE * contention.cores:g})")


def of_episodes(episodes) -> Contention | None:
    """The verdict over closed-loop episodes: their queries and load samples pooled (None when no
    episode recorded contention evidence)."""
    parts = [e.contention for e in episodes if e.contention is not None]
    if not parts:
        return None
    return of_records([q for e in episodes for q in e.queries], [v for c in parts for v in c.load_avg],
                      cores=max(c.cores for c in parts), device=parts[0].device)


def table_note(flags) -> str | None:
    """The one-line note under a table with a ``contended`` column, when any row is contended."""
    return f"* {NOTE}" if any(flags) else None
