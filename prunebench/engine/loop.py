"""The pruning engine: one VLA query with the decoder layer loop under our control.

The engine owns the loop over transformers' Llama decoder layers so that it can physically remove
visual tokens before the LLM or after any layer (gathering hidden states, positions and rotary
tables), keep attention bidirectional after every removal (llama_compat.run_layer, for every
supported transformers release), compute only the signals a plan asks for, read the actions out
through the kept-position map with one convention for every strategy, and account tokens, FLOPs
and time per stage.

On a GPU the loop waits for the device only where a removal needs values on the host (the signals
a stage scores with, the strategy's keep-set) and for the actions at the end; index tensors go to
the device without waiting, and signal values stay there until a stage or ``on_forward_end`` reads
them. (The stage timer synchronises at stage boundaries to charge GPU time to the right stage.)
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from prunebench.contract.errors import EngineError, StrategyError, strategy_code
from prunebench.contract.layout import TokenLayout, arange
from prunebench.contract.plan import BEFORE_LLM, PrunePlan, SignalRequest, Signals, Stage
from prunebench.contract.strategy import Observation, QueryContext, Strategy
from prunebench.engine import signals as sig
from prunebench.engine.accounting import QueryRecord, StageRecord, StageTimer, llm_flops
from prunebench.engine.kv_cache import KVCache
from prunebench.engine.merging import check_assignment, merge_visual
from prunebench.engine.pixels import patch_pixels_of
from prunebench.engine.transformers_compat import HAS_ATTENTION_REGISTRY, rotary, run_layer
from prunebench.engine.validation import check_keep, check_plan, check_tokens, valid_keep


@dataclass
class QueryResult:
    actions: np.ndarray  # (chunk, action_dim), unnormalised
    normalized: np.ndarray  # (chunk, action_dim) in [-1, 1]
    record: QueryRecord
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # stage.where -> visual indices


def debug_checks() -> bool:
    """``PRUNEBENCH_DEBUG_CHECKS=1``: every engine runs its full validity checks (the tests do)."""
    return os.environ.get("PRUNEBENCH_DEBUG_CHECKS", "") == "1"


class PruningEngine:
    """Runs queries of a model (see prunebench.models) under a strategy.

    ``checks``: diagnose every keep-set in full at every stage (default: ``debug_checks()``).
    Without it a keep-set passes one cheap test on the host and is diagnosed in full only when that
    fails, so every invalid keep-set raises the same error either way."""

    def __init__(self, model, record_kept: bool = False, checks: bool | None = None) -> None:
        self.model = model
        self.llm = model.llm
        self.record_kept = record_kept
        self.checks = debug_checks() if checks is None else checks
        self.device = next(model.parameters()).device
        # one key/value cache per strategy that asks for one (Strategy.reuses_kv), emptied at each
        # episode's first query; several strategies may share the engine (run_interleaved)
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def kv_cache(self, strategy: Strategy, query_index: int) -> KVCache | None:
        """The cache of ``strategy`` (None unless it sets ``reuses_kv``), empty at query 0."""
        if not strategy.reuses_kv:
            return None
        cache = self._caches.setdefault(strategy, KVCache())
        if query_index == 0:
            cache.clear()
        return cache

    @property
    def attention_backend(self) -> str:
        return self.llm.config._attn_implementation

    @torch.inference_mode()
    def query(self, strategy: Strategy, obs: Observation, *, query_index: int = 0, step_index: int = 0,
              seed: int = 0, frames=(), eef_history=(), actions_since_last_query=()) -> QueryResult:
        timer = StageTimer(sync=torch.cuda.synchronize if self.device.type == "cuda" else None)
        with timer("vision"):
            enc = self.model.encode(obs)
        layout = enc.layout
        ctx = self.context(obs, enc, query_index=query_index, step_index=step_index, seed=seed,
                           frames=list(frames), eef_history=list(eef_history),
                           actions_since_last_query=list(actions_since_last_query))
        name = strategy.label
        with timer("overhead"):
            with strategy_code(name, "schedule()"):
                plan = strategy.schedule(ctx)
            check_plan(name, strategy, plan, len(self.llm.layers))
            stages = {s.after_layer: s for s in plan.stages}
            attention_at: dict[int, list[SignalRequest]] = {}
            for r in plan.signals:
                if not r.before_llm:  # attention rows and entropies: while their layer runs
                    attention_at.setdefault(r.layer, []).append(r)
            signals = ctx.signals  # filled as the forward runs; the strategy reads it there too
            # (request, value on the device, its visual indices or None; or a list of requests and
            # their values as rows): moved to the host in one go when a stage or on_forward_end
            # reads signals
            pending: list = []
            self._input_signals(plan, enc, signals, pending, ctx)

        def to_host():
            for requests, value, columns in pending:
                value = sig.to_host(value, columns, layout.n_visual)
                if isinstance(requests, SignalRequest):
                    # visual keys travel with the visual index last (to_host fills that dimension)
                    signals[requests] = value.T if requests.form == "keys" else value
                else:  # one row per request, moved together
                    for request, row in zip(requests, value.unbind(0)):
                        signals[request] = row
            pending.clear()

        h = enc.embeds
        full_cos, full_sin = rotary(self.llm, h, self._on_device(layout.positions[None]))
        cos, sin = full_cos, full_sin
        recompact = strategy.position_ids == "recompact"
        stage_records: list[StageRecord] = []
        kept: dict[str, torch.Tensor] = {}
        tokens, visual, keys_per_layer = [], [], []
        n_other = layout.length - layout.n_visual  # non-visual tokens are never removed
        cache = self.kv_cache(strategy, query_index)
        reused = torch.empty(0, dtype=torch.long)  # visual indices whose keys/values come from the cache
        sizes = None  # original tokens each visual token holds, from the first merge that folds any

        def apply(stage: Stage, h: torch.Tensor):
            nonlocal cos, sin, reused, sizes
            to_host()
            slots, record, keep = self._apply_stage(name, strategy, stage, signals, ctx, layout)
            on_device = self._on_device(slots)
            merged = None
            if stage.verb == "merge":
                with strategy_code(name, f"stage {stage.where}: assign()"):
                    assignment = strategy.assign(stage, keep, ctx, ctx.current_layout)
                removed, into, weight = check_assignment(name, stage, assignment, keep, layout)
                held = torch.ones(layout.n_visual) if sizes is None else sizes
                merged = merge_visual(h, layout, keep, removed, into, weight, held)
                if removed.numel():  # until a token holds more than itself, no size bias at all
                    sizes = held
            elif stage.verb == "reuse":
                present = layout.present_visual()
                reused = torch.sort(torch.cat([reused, present[~torch.isin(present, keep)]])).values
            h = h.index_select(1, on_device)
            if merged is not None:  # the kept visual tokens fill the visual run, in keep's order
                first = layout.visual_span()[0]
                h[:, first:first + keep.numel()] = merged
            layout.keep_slots(slots)
            if recompact:
                cos, sin = full_cos[:, :len(slots)], full_sin[:, :len(slots)]
            else:
                cos, sin = cos.index_select(1, on_device), sin.index_select(1, on_device)
            if h.shape[1] != layout.current_length or layout.n_present_visual() != record.visual_after:
                raise EngineError(f"stage {stage.where} did not shorten the sequence as planned")
            stage_records.append(record)
            kept[stage.where] = keep
            return h

        def add_attention(requests: list[SignalRequest], compute, visual_keys) -> None:
            """``compute(rows, form)`` for the row-averaged requests together (one row each), then
            for each other request, ``visual_keys()`` for a keys request; the values wait in
            ``pending``."""
            present = layout.present_visual()
            attended = torch.cat([present, reused]) if reused.numel() else present  # cached keys last
            averaged = [r for r in requests if r.form == "mean"]
            if averaged:
                pending.append((averaged, compute([r.rows for r in averaged], "mean"), attended))
            for request in requests:
                if request.form == "keys":  # visual along the last dimension until on the host
                    pending.append((request, visual_keys().T, present))
                elif request.form != "mean":
                    columns = attended if request.form == "per_row" else None
                    pending.append((request, compute([request.rows], request.form)[0], columns))

        def observer(requests: list[SignalRequest]):
            """Computes ``requests`` inside the layer's attention, from the q and k it computes anyway."""
            def observe(module, query, key, bias):
                with timer("overhead", moved_from="llm"):
                    add_attention(requests, lambda rows, form: sig.attention_from_layer(
                        module, query, key, layout, rows, form, bias),
                        lambda: sig.keys_from_layer(key, cos, sin, layout))
            return observe

        def cached_keys(index: int):
            """Stores what layer ``index`` computes in the cache, and appends the reused tokens'
            cached keys and values to those it attends to. Device work inside the layer, charged to
            the LLM like the rest of the layer (no timer: it would wait for the GPU twice a layer)."""
            positions = layout.positions
            reused_positions = reused + layout.visual_start
            if reused.numel():
                missing = cache.missing(index, reused_positions, layout.length)
                if missing.numel():
                    raise StrategyError(name, f"layer {index} reuses visual tokens "
                                              f"{(missing - layout.visual_start).tolist()[:5]} that no "
                                              "earlier query of this episode computed there")

            def keys_and_values(module, key, value):
                cache.store(index, positions, key, value, layout.length)
                if reused.numel():
                    old_key, old_value = cache.fetch(index, reused_positions)
                    key, value = torch.cat([key, old_key], dim=2), torch.cat([value, old_value], dim=2)
                return key, value
            return keys_and_values

        def size_bias(h: torch.Tensor):
            """log(size) of every key (proportional attention), (1, 1, 1, n_keys); None before a merge."""
            if sizes is None or not plan.proportional_attention:
                return None
            first, stop = layout.visual_span()
            bias = torch.zeros(h.shape[1] + reused.numel())
            bias[first:stop] = sizes[layout.present_visual()].log()
            bias[h.shape[1]:] = sizes[reused].log()
            return bias.to(self.device, h.dtype, non_blocking=True)[None, None, None]

        if BEFORE_LLM in stages:
            with timer("overhead"):
                h = apply(stages[BEFORE_LLM], h)
        pos_ids = self._position_ids(layout, recompact, h.device)
        # one span for the decoder (the timer syncs a GPU at its boundaries, not at every layer);
        # signals and stages inside it are charged to overhead
        with timer("llm"):
            for index, layer in enumerate(self.llm.layers):
                wanted = attention_at.get(index)
                observe = None
                bias = size_bias(h)
                if wanted and HAS_ATTENTION_REGISTRY:
                    observe = observer(wanted)
                elif wanted:  # transformers < 4.48: recompute q and k from the layer's weights
                    with timer("overhead", moved_from="llm"):
                        add_attention(wanted, lambda rows, form: sig.attention_recomputed(
                            layer, h, cos, sin, layout, rows, form, bias),
                            lambda: sig.keys_recomputed(layer, h, layout))
                tokens.append(h.shape[1])
                visual.append(h.shape[1] - n_other)
                keys_per_layer.append(h.shape[1] + reused.numel())
                h = run_layer(self.llm, layer, h, pos_ids, cos, sin, observe,
                              keys=cached_keys(index) if cache is not None else None, bias=bias)
                if index in stages:
                    with timer("overhead", moved_from="llm"):
                        h = apply(stages[index], h)
                        pos_ids = self._position_ids(layout, recompact, h.device)
            h = self.llm.norm(h)
        with timer("head"):
            normalized = self.model.head(h[:, self._on_device(layout.readout_slots())])
            actions = self.model.unnormalize_actions(normalized)

        cfg = self.llm.config
        dense_tokens = [layout.length] * len(self.llm.layers)
        record = QueryRecord(
            query_index=query_index, step_index=step_index, dense=plan.is_dense,
            tokens_per_layer=tokens, visual_per_layer=visual,
            keys_per_layer=keys_per_layer if keys_per_layer != tokens else None,
            llm_flops=llm_flops(tokens, cfg.hidden_size, cfg.intermediate_size, keys_per_layer),
            dense_llm_flops=llm_flops(dense_tokens, cfg.hidden_size, cfg.intermediate_size),
            stages=stage_records)
        check_tokens(plan, record, layout)
        with timer("overhead"), strategy_code(name, "on_forward_end()"):
            to_host()
            strategy.on_forward_end(signals, record)
        record.ms = timer.total()
        record.cpu_ms = timer.cpu_ms
        return QueryResult(actions[0].float().cpu().numpy(), normalized[0].float().cpu().numpy(), record,
                           kept)

    def context(self, obs: Observation, enc=None, **fields) -> QueryContext:
        """The :class:`QueryContext` of a query of ``obs`` (``enc``: its ``model.encode(obs)``,
        computed here when not given); ``fields``: the other QueryContext fields."""
        enc = enc if enc is not None else self.model.encode(obs)
        return QueryContext(observation=obs, layout=enc.layout.copy(), n_layers=len(self.llm.layers),
                            patch_pixels=patch_pixels_of(self.model, obs, enc.images), **fields)

    # ------------------------------------------------------------------ pieces
    def _on_device(self, index: torch.Tensor) -> torch.Tensor:
        """A small host index tensor on the model's device, without waiting for the device."""
        return index if index.device == self.device else index.to(self.device, non_blocking=True)

    def _position_ids(self, layout: TokenLayout, recompact: bool, device: torch.device) -> torch.Tensor:
        if recompact:
            return torch.arange(layout.current_length, device=device)[None]
        return self._on_device(layout.positions[None])

    def _input_signals(self, plan: PrunePlan, enc, signals: Signals, pending: list,
                       ctx: QueryContext) -> None:
        """Signals that need no layer to have run: computed once on the unpruned input (device
        values go to ``pending``, moved to the host when a stage reads them)."""
        for request in plan.signals:
            if request.kind == "embeddings":
                pending.append((request, sig.visual_embeddings(enc.embeds, enc.layout), None))
            elif request.kind == "row_embeddings":
                pending.append((request, sig.row_embeddings(enc.embeds, enc.layout, request.rows), None))
            elif request.kind == "pixels":
                signals[request] = ctx.patch_pixels(ctx.observation.images)
            elif request.kind == "qk_logits":
                value = sig.qk_logits_to_visual(self.llm.layers[request.layer], enc.embeds, enc.layout,
                                                request.rows)
                pending.append((request, value, None))

    def _apply_stage(self, name: str, strategy: Strategy, stage: Stage, signals: Signals,
                     ctx: QueryContext, layout: TokenLayout):
        before = layout.n_present_visual()
        layout.present_visual()  # computed once: the copy shares it
        current = ctx.current_layout = layout.copy()  # what score() and select() see
        with strategy_code(name, f"stage {stage.where}: score()"):
            scores = strategy.score(stage, signals, ctx)
        if not isinstance(scores, torch.Tensor) or scores.shape != (layout.n_visual,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise StrategyError(name, f"stage {stage.where}: score() must return a tensor of shape "
                                      f"({layout.n_visual},), got {got}")
        with strategy_code(name, f"stage {stage.where}: select()"):
            keep = strategy.select(stage, scores, ctx, current)
        if self.checks:
            keep = check_keep(name, stage, keep, layout)
            kept_slots = layout.visual_to_slots(keep)
        else:
            keep, kept_slots = valid_keep(name, stage, keep, layout)
        # the visual tokens fill one run of slots; every non-visual token is kept
        first, stop = layout.visual_span()
        slots = torch.cat([arange(0, first), kept_slots, arange(stop, layout.current_length)])
        record = StageRecord(where=stage.where, name=stage.name, verb=stage.verb, visual_before=before,
                             visual_after=int(keep.numel()),
                             kept=keep.tolist() if self.record_kept else None)
        return slots, record, keep
