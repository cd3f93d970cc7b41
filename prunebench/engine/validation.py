"""The engine's checks of what a strategy returns: its plan, its keep-sets, and the tokens per
layer a query realised (docs/engine.md, "Validation"). Each failure is one line naming the strategy."""

from __future__ import annotations

import torch

from prunebench.contract.errors import EngineError, StrategyError
from prunebench.contract.layout import ROW_GROUPS, TokenLayout
from prunebench.contract.plan import BEFORE_LLM, SIGNAL_KINDS, VERBS, PrunePlan, SignalRequest, Stage
from prunebench.contract.strategy import Strategy
from prunebench.engine.accounting import QueryRecord
from prunebench.engine.transformers_compat import HAS_ATTENTION_REGISTRY


def valid_keep(name: str, stage: Stage, keep, layout: TokenLayout):
    """The keep-set sorted and its current slots, after one cheap test on the host that it holds
    distinct present visual indices; ``check_keep`` diagnoses it only when that test fails."""
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
    check_keep(name, stage, keep, layout)
    raise EngineError(f"stage {stage.where}: invalid keep-set that no check explains")  # unreachable


def check_keep(name: str, stage: Stage, keep, layout: TokenLayout) -> torch.Tensor:
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


def check_plan(name: str, strategy: Strategy, plan, n_layers: int) -> None:
    if not isinstance(plan, PrunePlan):
        raise StrategyError(name, f"schedule() must return a PrunePlan, got {type(plan).__name__}")
    last = n_layers - 2
    points = [s.after_layer for s in plan.stages]
    for point in points:
        if not BEFORE_LLM <= point <= last:
            raise StrategyError(name, f"plan has a stage after layer {point}; valid: -1 (before "
                                      f"the LLM) .. {last} (the model has {last + 2} layers)")
    if points != sorted(set(points)):
        raise StrategyError(name, f"plan stages must be in layer order, one per point; got {points}")
    for stage in plan.stages:
        if stage.verb not in VERBS:
            raise StrategyError(name, f"stage {stage.where}: unknown verb {stage.verb!r}; verbs: "
                                      f"{', '.join(VERBS)}")
        if stage.verb == "reuse" and not strategy.reuses_kv:
            raise StrategyError(name, f"stage {stage.where} reuses keys and values: set the "
                                      "strategy's reuses_kv = True so that the engine keeps them")
    if strategy.reuses_kv and strategy.position_ids != "original":  # its dense queries fill the cache too
        raise StrategyError(name, "reuses_kv: cached keys hold their original positions, so "
                                  "position_ids must be 'original'")
    if strategy.reuses_kv and not HAS_ATTENTION_REGISTRY:
        raise StrategyError(name, "reused keys and values need transformers >= 4.48 (an "
                                  "attention-function registry)")
    for request in plan.signals:
        if not isinstance(request, SignalRequest) or request.kind not in SIGNAL_KINDS:
            raise StrategyError(name, f"unknown signal {request!r}; kinds: {', '.join(SIGNAL_KINDS)}")
        if not 0 <= request.layer <= last + 1:
            raise StrategyError(name, f"signal {request.key}: layer {request.layer} out of range "
                                      f"0..{last + 1}")
        if request.kind not in ("embeddings", "pixels", "keys") and request.rows not in ROW_GROUPS:
            raise StrategyError(name, f"signal {request.key}: rows must be one of "
                                      f"{', '.join(ROW_GROUPS)}")


def check_tokens(plan: PrunePlan, record: QueryRecord, layout: TokenLayout) -> None:
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
