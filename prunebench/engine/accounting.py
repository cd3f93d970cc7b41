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
    """Accumulates time per stage name; ``with timer("llm"): ...``.

    ``cuda``: the spans are timed with CUDA events recorded on the current stream, so the host never
    waits for the device at a stage boundary (a wait there would stop the host from queueing the
    next kernels while the GPU works, and would cost more than many stages save). A span then
    measures the GPU timeline from its first to its last event: the GPU work it launched, plus any
    host work the GPU had to wait for. The events are read once, when the times are asked for
    (``ms`` or ``total()``), after the last one completed. Without ``cuda`` the spans are
    ``time.perf_counter`` intervals."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.cpu_ms: float | None = None  # set by total(): CPU time of this thread over the query
        self._spans: list[tuple[str, str | None, object, object]] = []  # stage, moved_from, start, end
        self._cpu_start = time.thread_time()
        self._start = time.perf_counter()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    @contextmanager
    def __call__(self, stage: str, moved_from: str | None = None):
        """Charge the span to ``stage``; ``moved_from``: the span lies inside that stage's own span,
        which gives it up (e.g. signals computed inside a layer call are overhead, not LLM time)."""
        start = self._mark()
        try:
            yield
        finally:
            self._spans.append((stage, moved_from, start, self._mark()))

    @property
    def ms(self) -> dict[str, float]:
        """Milliseconds per stage (on CUDA: waits for the last span's end on the device)."""
        if self.cuda and self._spans:
            self._spans[-1][3].synchronize()
        out = {name: 0.0 for name in STAGES}
        for stage, moved_from, start, end in self._spans:
            ms = self._elapsed_ms(start, end)
            out[stage] = out.get(stage, 0.0) + ms
            if moved_from is not None:
                out[moved_from] = out.get(moved_from, 0.0) - ms
        return out

    def total(self) -> dict[str, float]:
        out = self.ms  # on CUDA: after the device finished the query's last span
        out["total"] = (time.perf_counter() - self._start) * 1e3
        self.cpu_ms = (time.thread_time() - self._cpu_start) * 1e3  # this thread's CPU time, same span
        return out
