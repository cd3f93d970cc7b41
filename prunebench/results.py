"""Results schema (pydantic) and safe writing.

Every results file records the config, seed, versions (torch, transformers, mujoco, robosuite,
LIBERO, prunebench, git hash) and the attention backend. Files are written atomically (temporary
file + rename), so an interrupted run never leaves a half-written or clobbered file.
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
