"""A ``merge`` stage's arithmetic: each removed visual token folded into a kept one.

A kept token j that absorbs the removed tokens i -> j becomes the weighted mean
``(s_j h_j + sum_i w_i h_i) / (s_j + sum_i w_i)``, where s_j is j's size (how many original tokens
it holds, 1 before any merge) and w_i the assignment's weight (default: i's size), as ToMe merges
(Bolya et al., arXiv 2210.09461). j keeps its own original position, so rotary stays that of a real
token; its size grows by the sizes it absorbed. A keep-everything merge changes nothing.
"""

from __future__ import annotations

import torch

from prunebench.contract.errors import StrategyError
from prunebench.contract.layout import TokenLayout
from prunebench.contract.plan import Assignment, Stage


def check_assignment(name: str, stage: Stage, assignment, keep: torch.Tensor,
                     layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``assignment`` as host tensors (removed, into, weight), after checking that it folds present
    visual tokens outside ``keep`` (sorted), each at most once, into kept ones (the tokens it does
    not name are dropped)."""
    where = f"stage {stage.where}: assign()"
    if not isinstance(assignment, Assignment):
        raise StrategyError(name, f"{where} must return an Assignment, got {type(assignment).__name__}")
    removed, into = assignment.removed.cpu().long(), assignment.into.cpu().long()
    present = layout.present_visual()
    candidates = present[~torch.isin(present, keep)]
    if removed.shape != into.shape or removed.dim() != 1:
        raise StrategyError(name, f"{where}: removed and into must be 1-D and of one length")
    unique = torch.unique(removed)
    if unique.numel() != removed.numel() or not bool(torch.isin(removed, candidates).all()):
        raise StrategyError(name, f"{where}: removed must name present visual tokens that are not "
                                  "kept, each at most once")
    outside = into[~torch.isin(into, keep)]
    if outside.numel():
        raise StrategyError(name, f"{where}: into names {outside.tolist()[:5]}, which are not kept")
    weight = assignment.weight
    if weight is not None:
        weight = weight.detach().cpu().float()
        if weight.shape != removed.shape or not bool((weight > 0).all()):
            raise StrategyError(name, f"{where}: weight must be positive, one per removed token")
    return removed, into, weight


def merge_visual(h: torch.Tensor, layout: TokenLayout, keep: torch.Tensor, removed: torch.Tensor,
                 into: torch.Tensor, weight: torch.Tensor | None, sizes: torch.Tensor) -> torch.Tensor:
    """The kept visual tokens' hidden states after the merge, (1, len(keep), D), in ``keep``'s
    (sorted) order, computed in float32; ``sizes`` (n_visual,) is updated in place."""
    def on_device(x: torch.Tensor) -> torch.Tensor:  # small host tensors, without waiting for a GPU
        return x.to(h.device, non_blocking=True)

    kept_h = h.index_select(1, on_device(layout.visual_to_slots(keep))).float()
    removed_h = h.index_select(1, on_device(layout.visual_to_slots(removed))).float()
    w = sizes[removed] if weight is None else weight
    target = torch.searchsorted(keep, into)  # position of each target in the kept order
    total = sizes[keep].clone().index_add_(0, target, w)
    acc = (kept_h * on_device(sizes[keep])[None, :, None]).index_add_(
        1, on_device(target), removed_h * on_device(w)[None, :, None])
    sizes[keep] = sizes[keep].index_add(0, target, sizes[removed])
    return (acc / on_device(total)[None, :, None]).to(h.dtype)
