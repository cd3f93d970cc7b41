"""Results schema (pydantic) and safe writing.

Two result kinds share the pieces here: :class:`RunResults` (a strategy over an observation
stream) and :class:`EvalResults` (closed-loop LIBERO episodes, shaped after LeRobot's
``eval_info.json`` -- per_task / per_suite / overall -- and lm-evaluation-harness's results:
config, versions, git hash, seeds). Every file records the config, seed, versions (torch,
transformers, mujoco, robosuite, LIBERO, prunebench, git hash) and the attention backend. Files
are written atomically (temporary file + rename), so an interrupted run never leaves a
half-written or clobbered file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from prunebench.accounting import STAGES, QueryRecord

SCHEMA_VERSION = 1
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile (scipy.stats.norm.ppf(0.975))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a success rate; (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def median_speedup(dense_ms: list[dict[str, float]], ms: list[dict[str, float]]) -> dict[str, float]:
    """Median dense time / median time, for the whole query and the LLM (paired queries)."""
    return {k: float(np.median([d[k] for d in dense_ms]) / max(1e-9, np.median([m[k] for m in ms])))
            for k in ("total", "llm")}


class Stats(BaseModel):
    mean: float
    median: float
    p90: float

    @classmethod
    def of(cls, values) -> "Stats":
        a = np.asarray(list(values), dtype=float)
        if a.size == 0:
            return cls(mean=float("nan"), median=float("nan"), p90=float("nan"))
        return cls(mean=float(a.mean()), median=float(np.median(a)), p90=float(np.percentile(a, 90)))


class QuerySummary(BaseModel):
    """Aggregates over a list of query records."""

    n_queries: int
    latency_ms: dict[str, Stats]  # vision / llm / head / overhead / total
    mean_visual_tokens: float  # mean over queries and layers of visual tokens a layer processed
    mean_tokens_per_layer: list[float]
    mean_llm_flops: float
    dense_llm_flops: float

    @classmethod
    def of(cls, records: list[QueryRecord]) -> "QuerySummary":
        stages = STAGES + ("total",)
        return cls(
            n_queries=len(records),
            latency_ms={s: Stats.of(r.ms.get(s, 0.0) for r in records) for s in stages},
            mean_visual_tokens=float(np.mean([np.mean(r.visual_per_layer) for r in records])),
            mean_tokens_per_layer=np.mean([r.tokens_per_layer for r in records], axis=0).tolist(),
            mean_llm_flops=float(np.mean([r.llm_flops for r in records])),
            dense_llm_flops=float(np.mean([r.dense_llm_flops for r in records])),
        )


class StrategyInfo(BaseModel):
    name: str
    config: dict[str, Any]
    position_ids: str
    plugin: str | None = None


class RunResults(BaseModel):
    """One strategy run over an observation stream."""

    schema_version: int = SCHEMA_VERSION
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    command: str = ""
    seed: int
    strategy: StrategyInfo
    model: dict[str, Any]
    source: dict[str, Any]
    attention_backend: str
    environment: dict[str, Any]
    summary: QuerySummary
    queries: list[QueryRecord]


def write_json(path: str | Path, model: BaseModel) -> Path:
    """Write atomically; refuses nothing, overwrites only by rename of a complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(model.model_dump_json(indent=2))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | Path) -> RunResults:
    return RunResults.model_validate(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- closed-loop episodes
class ClosedLoopQuery(QueryRecord):
    """A query in an episode, plus the dense forward run on the same observation in the same process
    (its time and its actions), which gives the speedup and the action deviation vs dense."""

    dense_ms: dict[str, float] | None = None
    action_l1_vs_dense: float | None = None  # mean |a - a_dense| over the chunk, unnormalised


class EpisodeResult(BaseModel):
    suite: str
    task_id: int
    task: str
    instruction: str
    init_state_id: int
    episode_index: int
    seed: int
    success: bool
    steps: int  # policy steps executed (wait steps excluded)
    n_queries: int
    early_requeries: int = 0
    failure_reason: str | None = None  # None on success; "timeout", "simulation: ...", "error: ..."
    wall_s: float
    video: str | None = None
    stream: str | None = None
    queries: list[ClosedLoopQuery] = Field(default_factory=list)


class GroupResult(BaseModel):
    """Aggregates over episodes (a task, a suite or the whole run)."""

    n_episodes: int
    n_success: int
    success_rate: float
    success_ci95: tuple[float, float]  # Wilson score interval
    mean_steps: float
    failures: dict[str, int]  # failure kind -> count
    queries: QuerySummary | None
    speedup_vs_dense: dict[str, float] | None  # median dense ms / median ms, per stage (same run)
    action_l1_vs_dense: float | None

    @classmethod
    def of(cls, episodes: list[EpisodeResult]) -> "GroupResult":
        n, wins = len(episodes), sum(e.success for e in episodes)
        failures: dict[str, int] = {}
        for e in episodes:
            if e.failure_reason:
                kind = e.failure_reason.split(":")[0]
                failures[kind] = failures.get(kind, 0) + 1
        records = [q for e in episodes for q in e.queries]
        paired = [q for q in records if q.dense_ms]
        speedup = median_speedup([q.dense_ms for q in paired], [q.ms for q in paired]) if paired else None
        l1 = [q.action_l1_vs_dense for q in records if q.action_l1_vs_dense is not None]
        return cls(n_episodes=n, n_success=wins, success_rate=wins / n if n else 0.0,
                   success_ci95=wilson_interval(wins, n),
                   mean_steps=float(np.mean([e.steps for e in episodes])) if n else 0.0,
                   failures=failures, queries=QuerySummary.of(records) if records else None,
                   speedup_vs_dense=speedup, action_l1_vs_dense=float(np.mean(l1)) if l1 else None)


class EvalResults(BaseModel):
    """A closed-loop LIBERO evaluation of one strategy."""

    schema_version: int = SCHEMA_VERSION
    kind: str = "libero_eval"
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    command: str = ""
    complete: bool = False  # False while running, or when interrupted
    interrupted: bool = False
    seed: int
    config: dict[str, Any]
    strategy: StrategyInfo
    model: dict[str, Any]
    protocol: dict[str, Any]
    init_state_ids: dict[str, list[int]]  # "suite/task_id" -> official init-state indices
    attention_backend: str
    environment: dict[str, Any]
    eval_s: float = 0.0
    episodes_per_hour: float = 0.0
    overall: GroupResult | None = None
    per_suite: dict[str, GroupResult] = Field(default_factory=dict)
    per_task: dict[str, GroupResult] = Field(default_factory=dict)
    episodes: list[EpisodeResult] = Field(default_factory=list)

    def aggregate(self) -> "EvalResults":
        """Recompute per_task / per_suite / overall from the episodes."""
        by_task: dict[str, list[EpisodeResult]] = {}
        by_suite: dict[str, list[EpisodeResult]] = {}
        for e in sorted(self.episodes, key=lambda e: (e.suite, e.task_id, e.init_state_id)):
            by_task.setdefault(f"{e.suite}/{e.task_id}", []).append(e)
            by_suite.setdefault(e.suite, []).append(e)
        self.per_task = {k: GroupResult.of(v) for k, v in by_task.items()}
        self.per_suite = {k: GroupResult.of(v) for k, v in by_suite.items()}
        self.overall = GroupResult.of(self.episodes) if self.episodes else None
        return self


def read_eval_results(path: str | Path) -> EvalResults:
    return EvalResults.model_validate(json.loads(Path(path).read_text()))
