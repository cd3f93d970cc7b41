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
from dataclasses import dataclass, field

import numpy as np
import torch

from prunebench.contract.errors import EngineError, StrategyError, strategy_code
from prunebench.contract.layout import ROW_GROUPS, TokenLayout, arange
from prunebench.contract.plan import BEFORE_LLM, SIGNAL_KINDS, PrunePlan, SignalRequest, Signals, Stage
from prunebench.contract.strategy import Observation, QueryContext, Strategy
from prunebench.engine import signals as sig
from prunebench.engine.accounting import QueryRecord, StageRecord, StageTimer, llm_flops
from prunebench.engine.pixels import patch_pixels_of
from prunebench.engine.transformers_compat import HAS_ATTENTION_REGISTRY, rotary, run_layer


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
            self._check_plan(name, plan)
            stages = {s.after_layer: s for s in plan.stages}
            attention_at: dict[int, list[SignalRequest]] = {}
            for r in plan.signals:
                if r.kind == "attention":
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
                    signals[requests] = value
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
        tokens, visual = [], []
        n_other = layout.length - layout.n_visual  # non-visual tokens are never removed

        def apply(stage: Stage, h: torch.Tensor):
            nonlocal cos, sin
            to_host()
            slots, record, keep = self._apply_stage(name, strategy, stage, signals, ctx, layout)
            on_device = self._on_device(slots)
            h = h.index_select(1, on_device)
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

        def add_attention(requests: list[SignalRequest], compute) -> None:
            """``compute(rows, per_row)`` for the row-averaged requests together (one row each),
            then for each per-row request; the values wait in ``pending``."""
            present = layout.present_visual()
            averaged = [r for r in requests if not r.per_row]
            if averaged:
                pending.append((averaged, compute([r.rows for r in averaged], False), present))
            for request in requests:
                if request.per_row:
                    pending.append((request, compute([request.rows], True)[0], present))

        def observer(requests: list[SignalRequest]):
            """Computes ``requests`` inside the layer's attention, from the q and k it computes anyway."""
            def observe(module, query, key):
                with timer("overhead", moved_from="llm"):
                    add_attention(requests, lambda rows, per_row: sig.attention_from_layer(
                        module, query, key, layout, rows, per_row))
            return observe

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
                if wanted and HAS_ATTENTION_REGISTRY:
                    observe = observer(wanted)
                elif wanted:  # transformers < 4.48: recompute q and k from the layer's weights
                    with timer("overhead", moved_from="llm"):
                        add_attention(wanted, lambda rows, per_row: sig.attention_recomputed(
                            layer, h, cos, sin, layout, rows, per_row))
                h = run_layer(self.llm, layer, h, pos_ids, cos, sin, observe)
                tokens.append(h.shape[1])
                visual.append(h.shape[1] - n_other)
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
            llm_flops=llm_flops(tokens, cfg.hidden_size, cfg.intermediate_size),
            dense_llm_flops=llm_flops(dense_tokens, cfg.hidden_size, cfg.intermediate_size),
            stages=stage_records)
        self._check_tokens(plan, record, layout)
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
            keep = self._check_keep(name, stage, keep, layout)
            kept_slots = layout.visual_to_slots(keep)
        else:
            keep, kept_slots = self._valid_keep(name, stage, keep, layout)
        # the visual tokens fill one run of slots; every non-visual token is kept
        first, stop = layout.visual_span()
        slots = torch.cat([arange(0, first), kept_slots, arange(stop, layout.current_length)])
        record = StageRecord(where=stage.where, name=stage.name, visual_before=before,
                             visual_after=int(keep.numel()),
                             kept=keep.tolist() if self.record_kept else None)
        return slots, record, keep

    @classmethod
    def _valid_keep(cls, name: str, stage: Stage, keep, layout: TokenLayout):
        """The keep-set sorted and its current slots, after one cheap test on the host that it holds
        distinct present visual indices; ``_check_keep`` diagnoses it only when that test fails."""
        is_index = isinstance(keep, torch.Tensor) and keep.dim() == 1 and not keep.is_floating_point()
        present = layout.present_visual()  # sorted
        if is_index and keep.numel() and present.numel():
            if keep.device.type != "cpu" or keep.dtype != torch.long:
                keep = keep.cpu().long()  # waits for the device only if the strategy selected there
            unique = torch.unique(keep)
            if unique.numel() == keep.numel():  # distinct
                at = torch.searchsorted(present, unique).clamp_(max=present.numel() - 1)
                if torch.equal(present[at], unique):  # all visual and still in the sequence
                    return unique, at + layout.visual_span()[0]
        cls._check_keep(name, stage, keep, layout)
        raise EngineError(f"stage {stage.where}: invalid keep-set that no check explains")  # unreachable

    @staticmethod
    def _check_keep(name: str, stage: Stage, keep, layout: TokenLayout) -> torch.Tensor:
        """Full diagnosis of a keep-set (every stage with ``checks``); returns it sorted."""
        where = f"stage {stage.where}: keep-set"
        if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.is_floating_point():
            raise StrategyError(name, f"{where} must be a 1-D integer tensor of visual indices")
        keep = keep.cpu().long()  # small: the checks below read its values on the host
        if keep.numel() == 0:
            raise StrategyError(name, f"{where} is empty (keep at least one visual token)")
        bad = keep[(keep < 0) | (keep >= layout.n_visual)]
        if bad.numel():
            raise StrategyError(name, f"{where} has indices {bad.tolist()[:5]} outside the visual "
                                      f"tokens 0..{layout.n_visual - 1}; non-visual tokens (BOS, "
                                      "proprio, prompt, actions, STOP) cannot be removed")
        unique, counts = torch.unique(keep, return_counts=True)
        if (counts > 1).any():
            raise StrategyError(name, f"{where} has duplicate indices {unique[counts > 1].tolist()[:5]}")
        absent = unique[~torch.isin(unique, layout.present_visual())]
        if absent.numel():
            raise StrategyError(name, f"{where} keeps {absent.tolist()[:5]}, already removed earlier")
        return unique

    def _check_plan(self, name: str, plan) -> None:
        if not isinstance(plan, PrunePlan):
            raise StrategyError(name, f"schedule() must return a PrunePlan, got {type(plan).__name__}")
        last = len(self.llm.layers) - 2
        points = [s.after_layer for s in plan.stages]
        for point in points:
            if not BEFORE_LLM <= point <= last:
                raise StrategyError(name, f"plan has a stage after layer {point}; valid: -1 (before "
                                          f"the LLM) .. {last} (the model has {last + 2} layers)")
        if points != sorted(set(points)):
            raise StrategyError(name, f"plan stages must be in layer order, one per point; got {points}")
        for request in plan.signals:
            if not isinstance(request, SignalRequest) or request.kind not in SIGNAL_KINDS:
                raise StrategyError(name, f"unknown signal {request!r}; kinds: {', '.join(SIGNAL_KINDS)}")
            if not 0 <= request.layer <= last + 1:
                raise StrategyError(name, f"signal {request.key}: layer {request.layer} out of range "
                                          f"0..{last + 1}")
            if request.kind in ("attention", "qk_logits", "row_embeddings") and request.rows not in ROW_GROUPS:
                raise StrategyError(name, f"signal {request.key}: rows must be one of "
                                          f"{', '.join(ROW_GROUPS)}")

    @staticmethod
    def _check_tokens(plan: PrunePlan, record: QueryRecord, layout: TokenLayout) -> None:
        """Realised tokens per layer must equal what the stage records imply."""
        n_other = layout.length - layout.n_visual
        expected, current = [], layout.n_visual
        after = {int(r.where.rsplit("_", 1)[1]) if r.where != "before_llm" else BEFORE_LLM: r.visual_after
                 for r in record.stages}
        current = after.get(BEFORE_LLM, current)
        for index in range(len(record.tokens_per_layer)):
            expected.append(n_other + current)
            current = after.get(index, current)
        if expected != record.tokens_per_layer:
            raise EngineError(f"tokens per layer {record.tokens_per_layer} differ from the plan {expected}")
