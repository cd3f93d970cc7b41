"""The pruning engine: one VLA query with the decoder layer loop under our control.

The engine owns the loop over transformers' Llama decoder layers so that it can physically remove
visual tokens before the LLM or after any layer (gathering hidden states, positions and rotary
tables), keep attention bidirectional after every removal (llama_compat.run_layer, for every
supported transformers release), compute only the signals a plan asks for, read the actions out
through the kept-position map with one convention for every strategy, and account tokens, FLOPs
and time per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prunebench import signals as sig
from prunebench.accounting import QueryRecord, StageRecord, StageTimer, llm_flops
from prunebench.errors import EngineError, StrategyError, strategy_code
from prunebench.interface import (BEFORE_LLM, SIGNAL_KINDS, Observation, PrunePlan, QueryContext,
                                  Signals, SignalRequest, Stage, Strategy)
from prunebench.layout import ROW_GROUPS, TokenLayout
from prunebench.llama_compat import rotary, run_layer


@dataclass
class QueryResult:
    actions: np.ndarray  # (chunk, action_dim), unnormalised
    normalized: np.ndarray  # (chunk, action_dim) in [-1, 1]
    record: QueryRecord
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # stage.where -> visual indices


class PruningEngine:
    """Runs queries of a model (see prunebench.models) under a strategy."""

    def __init__(self, model, record_kept: bool = False) -> None:
        self.model = model
        self.llm = model.llm
        self.record_kept = record_kept
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
            signals = Signals()
            self._input_signals(plan, enc, signals, ctx)

        h = enc.embeds
        full_cos, full_sin = rotary(self.llm, h, layout.positions[None].to(h.device))
        cos, sin = full_cos, full_sin
        recompact = strategy.position_ids == "recompact"
        stage_records: list[StageRecord] = []
        kept: dict[str, torch.Tensor] = {}
        tokens, visual = [], []
        n_other = layout.length - layout.n_visual  # non-visual tokens are never removed

        def apply(stage: Stage, h: torch.Tensor):
            nonlocal cos, sin
            slots, record, keep = self._apply_stage(name, strategy, stage, signals, ctx, layout)
            h = h[:, slots]
            layout.keep_slots(slots)
            if recompact:
                cos, sin = full_cos[:, :len(slots)], full_sin[:, :len(slots)]
            else:
                cos, sin = cos[:, slots], sin[:, slots]
            if h.shape[1] != layout.current_length or layout.n_present_visual() != record.visual_after:
                raise EngineError(f"stage {stage.where} did not shorten the sequence as planned")
            stage_records.append(record)
            kept[stage.where] = keep
            return h

        if BEFORE_LLM in stages:
            with timer("overhead"):
                h = apply(stages[BEFORE_LLM], h)
        pos_ids = self._position_ids(layout, recompact, h.device)
        for index, layer in enumerate(self.llm.layers):
            wanted = [r for r in plan.signals if r.kind == "attention" and r.layer == index]
            if wanted:
                with timer("overhead"):
                    values = sig.attention_to_visual(layer, h, cos, sin, layout, [r.rows for r in wanted])
                    for request in wanted:
                        signals[request] = values[request.rows]
            with timer("llm"):
                h = run_layer(self.llm, layer, h, pos_ids, cos, sin)
            tokens.append(h.shape[1])
            visual.append(h.shape[1] - n_other)
            if index in stages:
                with timer("overhead"):
                    h = apply(stages[index], h)
                    pos_ids = self._position_ids(layout, recompact, h.device)
        with timer("llm"):
            h = self.llm.norm(h)
        with timer("head"):
            normalized = self.model.head(h[:, layout.readout_slots()])
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
                            patch_pixels=self._patch_pixels_of(obs, enc.images), **fields)

    def _patch_pixels_of(self, obs: Observation, current: torch.Tensor):
        """``QueryContext.patch_pixels`` of one query: a frame through the model's own preprocessing
        (``preprocess_images``) and patch grid (``patch_pixels``); the current frame reuses its
        preprocessed ``current`` images. Memoised per frame object for the query."""
        memo: dict[int, tuple[dict, torch.Tensor]] = {}

        def patch_pixels(images: dict[str, np.ndarray]) -> torch.Tensor:
            hit = memo.get(id(images))
            if hit is not None and hit[0] is images:
                return hit[1]
            if images is obs.images:
                pre = current
            else:
                pre = self.model.preprocess_images(Observation(images, obs.proprio, obs.instruction))
            value = self.model.patch_pixels(pre)
            memo[id(images)] = (images, value)
            return value

        return patch_pixels

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _position_ids(layout: TokenLayout, recompact: bool, device: torch.device) -> torch.Tensor:
        if recompact:
            return torch.arange(layout.current_length, device=device)[None]
        return layout.positions[None].to(device)

    def _input_signals(self, plan: PrunePlan, enc, signals: Signals, ctx: QueryContext) -> None:
        """Signals that need no layer to have run: computed once on the unpruned input."""
        for request in plan.signals:
            if request.kind == "embeddings":
                signals[request] = sig.visual_embeddings(enc.embeds, enc.layout)
            elif request.kind == "pixels":
                signals[request] = ctx.patch_pixels(ctx.observation.images)
            elif request.kind == "qk_logits":
                signals[request] = sig.qk_logits_to_visual(self.llm.layers[request.layer], enc.embeds,
                                                           enc.layout, request.rows)

    def _apply_stage(self, name: str, strategy: Strategy, stage: Stage, signals: Signals,
                     ctx: QueryContext, layout: TokenLayout):
        before = layout.n_present_visual()
        with strategy_code(name, f"stage {stage.where}: score()"):
            scores = strategy.score(stage, signals, ctx)
        if not isinstance(scores, torch.Tensor) or scores.shape != (layout.n_visual,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise StrategyError(name, f"stage {stage.where}: score() must return a tensor of shape "
                                      f"({layout.n_visual},), got {got}")
        with strategy_code(name, f"stage {stage.where}: select()"):
            keep = strategy.select(stage, scores, ctx, layout.copy())
        keep = self._check_keep(name, stage, keep, layout)
        slots = torch.sort(torch.cat([torch.nonzero(~layout.is_visual_slot(), as_tuple=True)[0],
                                      layout.visual_to_slots(keep)])).values
        record = StageRecord(where=stage.where, name=stage.name, visual_before=before,
                             visual_after=int(keep.numel()),
                             kept=keep.tolist() if self.record_kept else None)
        return slots, record, keep

    @staticmethod
    def _check_keep(name: str, stage: Stage, keep, layout: TokenLayout) -> torch.Tensor:
        where = f"stage {stage.where}: keep-set"
        if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.is_floating_point():
            raise StrategyError(name, f"{where} must be a 1-D integer tensor of visual indices")
        keep = keep.long()
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
            if request.kind in ("attention", "qk_logits") and request.rows not in ROW_GROUPS:
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
