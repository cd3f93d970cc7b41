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

import contextlib
import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from prunebench.contract.errors import OutputError
from prunebench.engine.accounting import STAGES, QueryRecord
from prunebench.evaluation import contention, metrics
from prunebench.evaluation.contention import Contention

# 2: action error on normalised actions, episode errors apart from failures; 3: episode seeds from
# (seed, suite, task, init state), not the episode's position in the run (protocol.episode_seed); Stats.p10
SCHEMA_VERSION = 3


class Stats(BaseModel):
    mean: float
    median: float
    p10: float = float("nan")  # NaN in files written before schema 3
    p90: float

    @classmethod
    def of(cls, values) -> "Stats":
        a = np.asarray(list(values), dtype=float)
        if a.size == 0:
            return cls(mean=float("nan"), median=float("nan"), p10=float("nan"), p90=float("nan"))
        return cls(mean=float(a.mean()), median=float(np.median(a)), p10=float(np.percentile(a, 10)),
                   p90=float(np.percentile(a, 90)))


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
    plugin: str | None = None  # the plugin that registered the strategy
    distribution: str | None = None  # the package that ships that plugin
    version: str | None = None  # that package's version

    @classmethod
    def of(cls, name: str, strategy) -> "StrategyInfo":
        """A created strategy with its validated config and where it comes from."""
        from prunebench.evaluation.versions import strategy_provenance

        return cls(name=name, config=strategy.config.model_dump(), position_ids=strategy.position_ids,
                   **strategy_provenance(name))


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
    contention: Contention | None = None  # was the machine busy while the queries were timed
    queries: list[QueryRecord]


def write_json(path: str | Path, model: BaseModel) -> Path:
    """Write atomically; refuses nothing, overwrites only by rename of a complete file."""
    return write_text(path, model.model_dump_json(indent=2))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + rename): a reader or a crash sees the
    old file or the new one, never part of one. A failed write (disk full, folder made read-only)
    leaves the old file intact and is one line naming the file and the OS error."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data (power loss)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):  # a folder made read-only keeps it: nothing to do
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {path}: {err.strerror or err}; what it held before is "
                              f"intact") from err
        raise
    return path


def temp_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file in ``path``'s folder, created 0o666 less the umask like any file the user
    makes (``tempfile.mkstemp`` creates 0o600, and the rename would keep that mode)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def read_results(path: str | Path) -> RunResults:
    return RunResults.model_validate(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- closed-loop episodes
class ClosedLoopQuery(QueryRecord):
    """A query in an episode, plus the dense forward run on the same observation in the same process
    (its time and its actions), which gives the speedup and the action deviation vs dense."""

    dense_ms: dict[str, float] | None = None
    action_error_vs_dense: float | None = None  # prunebench.evaluation.metrics.action_error


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
    failure_reason: str | None = None  # a policy failure: "timeout" or "simulation: ..."; else None
    # an exception that ended the episode (not a policy outcome: counted apart from success/failure)
    error: str | None = None  # "Type: message", one line
    traceback: str | None = None
    wall_s: float
    video: str | None = None
    stream: str | None = None
    # read inside the process that ran the episode: its torch threads, the model's device, and the
    # contention evidence (load average at the episode's start and end, CPU/wall of its queries)
    threads: int | None = None
    device: str | None = None
    contention: Contention | None = None
    queries: list[ClosedLoopQuery] = Field(default_factory=list)


class GroupResult(BaseModel):
    """Aggregates over episodes (a task, a suite or the whole run); definitions in prunebench.evaluation.metrics."""

    n_episodes: int  # episodes that ended in success or failure (errors excluded)
    n_success: int
    n_errors: int = 0  # episodes that raised: neither success nor failure
    success_rate: float | None  # None when no episode had an outcome (never a 0 that means errors)
    success_ci95: tuple[float, float]  # Wilson score interval
    mean_steps: float | None  # over episodes with an outcome
    failures: dict[str, int]  # failure kind -> count
    errors: dict[str, int] = Field(default_factory=dict)  # error line -> count
    queries: QuerySummary | None
    speedup_vs_dense: dict[str, float] | None  # metrics.speedups (same run, paired queries)
    dense_query_ms: float | None = None  # metrics.latency_ms of those paired dense queries
    action_error_vs_dense: float | None  # metrics.action_error, mean over queries
    contention: Contention | None = None  # the episodes' queries and load samples, pooled

    @classmethod
    def of(cls, episodes: list[EpisodeResult]) -> "GroupResult":
        errors: dict[str, int] = {}
        for e in episodes:
            if e.error:
                errors[e.error] = errors.get(e.error, 0) + 1
        outcomes = [e for e in episodes if not e.error]
        n, wins = len(outcomes), sum(e.success for e in outcomes)
        failures: dict[str, int] = {}
        for e in outcomes:
            if e.failure_reason:
                kind = e.failure_reason.split(":")[0]
                failures[kind] = failures.get(kind, 0) + 1
        records = [q for e in episodes for q in e.queries]
        paired = [q for q in records if q.dense_ms]
        speedup = metrics.speedups([q.dense_ms for q in paired], [q.ms for q in paired]) if paired else None
        errs = [q.action_error_vs_dense for q in records if q.action_error_vs_dense is not None]
        return cls(n_episodes=n, n_success=wins, n_errors=len(episodes) - n,
                   success_rate=metrics.success_rate(wins, n),
                   success_ci95=metrics.wilson_interval(wins, n),
                   mean_steps=float(np.mean([e.steps for e in outcomes])) if n else None,
                   failures=failures, errors=errors, queries=QuerySummary.of(records) if records else None,
                   speedup_vs_dense=speedup,
                   dense_query_ms=metrics.latency_ms(q.dense_ms for q in paired) if paired else None,
                   action_error_vs_dense=float(np.mean(errs)) if errs else None,
                   contention=contention.of_episodes(episodes))


class EvalResults(BaseModel):
    """A closed-loop LIBERO evaluation of one strategy."""

    schema_version: int = SCHEMA_VERSION
    kind: str = "libero_eval"
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    command: str = ""
    complete: bool = False  # False while running, or when interrupted or aborted
    interrupted: bool = False
    aborted: str | None = None  # why the run stopped early on errors
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
