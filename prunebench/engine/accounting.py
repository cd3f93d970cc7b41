"""Per-query accounting: tokens per layer, analytic FLOPs, time per stage.

FLOPs follow FastV's per-layer count (Chen et al., arXiv 2403.06764), with three FFN matrices for
Llama's gated MLP where FastV counts two: one decoder layer at sequence length n costs
F(n) = 4·n·d² + 2·n²·d + 3·n·d·m multiply-accumulates (d hidden, m FFN width). We report
``llm_flops = 2 · Σ_layers F(n_layer)`` (one MAC = 2 FLOPs), which is how ADP's 7.91 TFLOPs for the
dense OFT-7B reads.

The stage verbs (docs/engine.md): a layer computes n queries (tokens in its sequence) and attends to
n_k keys, n_k = n plus the tokens a ``reuse`` stage serves from the cache. Projections and MLP run for
the n computed tokens only; the attention products for n x n_k:
F(n, n_k) = 4·n·d² + 2·n·n_k·d + 3·n·d·m. A merged token is one token (counted once); dropping is
n_k = n, the formula above.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from pydantic import BaseModel, Field

STAGES = ("vision", "llm", "head", "overhead")


def layer_macs(n: int, d: int, m: int, n_keys: int | None = None) -> float:
    n_keys = n if n_keys is None else n_keys
    return 4.0 * n * d * d + 2.0 * n * n_keys * d + 3.0 * n * d * m


def llm_flops(tokens_per_layer: list[int], d: int, m: int, keys_per_layer: list[int] | None = None) -> float:
    keys_per_layer = keys_per_layer or tokens_per_layer
    return 2.0 * sum(layer_macs(n, d, m, k) for n, k in zip(tokens_per_layer, keys_per_layer))


class StageRecord(BaseModel):
    where: str  # "before_llm" | "after_layer_<l>"
    name: str = ""
    verb: str = "drop"  # what became of the visual tokens not kept: drop | merge | reuse
    visual_before: int
    visual_after: int
    kept: list[int] | None = None  # visual indices kept (only when the engine records them)


class QueryRecord(BaseModel):
    """What one forward cost and did."""

    query_index: int = 0
    step_index: int = 0
    dense: bool = True
    tokens_per_layer: list[int]  # tokens each layer computes (its queries)
    visual_per_layer: list[int]
    keys_per_layer: list[int] | None = None  # tokens each layer attends to, when not the same (reuse)
    llm_flops: float
    dense_llm_flops: float
    ms: dict[str, float] = Field(default_factory=dict)  # vision / llm / head / overhead / total
    # CPU time of the thread that ran the query, over the same span as ms["total"]: far below the
    # wall time means the query waited for a CPU (prunebench.evaluation.contention)
    cpu_ms: float | None = None
    stages: list[StageRecord] = Field(default_factory=list)

    @property
    def flops_ideal_speedup(self) -> float:
        return self.dense_llm_flops / self.llm_flops


class StageTimer:
    """Accumulates wall time per stage name; ``with timer("llm"): ...``.

    ``sync`` (e.g. torch.cuda.synchronize) runs at every stage boundary, so that asynchronous GPU
    work is charged to the stage that launched it."""

    def __init__(self, sync=None) -> None:
        self.ms = {name: 0.0 for name in STAGES}
        self.sync = sync or (lambda: None)
        self.cpu_ms: float | None = None  # set by total(): CPU time of this thread over the query
        self._cpu_start = time.thread_time()
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str, moved_from: str | None = None):
        """Charge the span to ``stage``; ``moved_from``: the span lies inside that stage's own span,
        which gives it up (e.g. signals computed inside a layer call are overhead, not LLM time)."""
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            ms = (time.perf_counter() - t0) * 1e3
            self.ms[stage] = self.ms.get(stage, 0.0) + ms
            if moved_from is not None:
                self.ms[moved_from] = self.ms.get(moved_from, 0.0) - ms

    def total(self) -> dict[str, float]:
        out = dict(self.ms)
        out["total"] = (time.perf_counter() - self._start) * 1e3
        self.cpu_ms = (time.thread_time() - self._cpu_start) * 1e3  # this thread's CPU time, same span
        return out
