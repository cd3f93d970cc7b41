"""Selectors: turn per-visual-token scores into a keep-set (visual indices, sorted).

Shared by every strategy, so top-k, per-view quotas, unions and diversity are written once.
"""

from __future__ import annotations

import torch

from prunebench.interface import Budget
from prunebench.layout import TokenLayout


def top_k(scores: torch.Tensor, k: int, among: torch.Tensor, ordered: bool = False) -> torch.Tensor:
    """The ``k`` highest-scoring visual indices from ``among`` (ties broken by lower index), sorted
    by index, or best first when ``ordered``."""
    k = min(k, int(among.numel()))
    if k <= 0:
        return among[:0]
    values = scores[among].float().nan_to_num(nan=float("-inf"))
    # stable: sort by descending score, then ascending index
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    return among[order] if ordered else torch.sort(among[order]).values


def present_in_view(layout: TokenLayout, view: int) -> torch.Tensor:
    present = layout.present_visual()
    r = layout.visual_range(view)
    return present[(present >= r.start) & (present < r.stop)]


def top_k_under_budget(scores: torch.Tensor, budget: Budget, layout: TokenLayout,
                       force_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k under a budget (per view or global); ``force_keep`` indices are kept on top of it."""
    if budget.per_view:
        parts = [top_k(scores, q, present_in_view(layout, v))
                 for v, q in enumerate(budget.quotas(layout))]
        keep = torch.cat(parts)
    else:
        keep = top_k(scores, budget.total(layout), layout.present_visual())
    if force_keep is not None:
        keep = union(keep, force_keep)
    return keep


def union(*keep_sets: torch.Tensor) -> torch.Tensor:
    return torch.unique(torch.cat([k.long() for k in keep_sets]))


def max_min_diverse(candidates: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy farthest-point selection of ``k`` of ``candidates`` by cosine distance of ``features``.

    Starts from the most isolated candidate (largest distance to its nearest neighbour), then adds
    the candidate whose minimum distance to the chosen set is largest (VLA-Pruner's filter).
    ``features`` is indexed by visual index.
    """
    if candidates.numel() <= k:
        return torch.sort(candidates).values
    f = torch.nn.functional.normalize(features[candidates].float(), dim=-1)
    dist = 1.0 - f @ f.T
    nearest = dist.clone()
    nearest.fill_diagonal_(float("inf"))
    chosen = [int(nearest.min(dim=0).values.argmax())]
    closest = dist[chosen[0]].clone()
    while len(chosen) < k:
        closest[chosen] = -1.0
        nxt = int(closest.argmax())
        chosen.append(nxt)
        closest = torch.minimum(closest, dist[nxt])
    return torch.sort(candidates[torch.tensor(chosen)]).values


def uniform_grid(rows: int, cols: int, k: int) -> torch.Tensor:
    """``k`` raster indices spread evenly over a rows x cols grid (spatial downsampling)."""
    if k >= rows * cols:
        return torch.arange(rows * cols)
    # choose a sub-grid with about the grid's aspect ratio and at least k points, then thin it
    sub_rows = max(1, min(rows, round((k * rows / cols) ** 0.5)))
    sub_cols = min(cols, -(-k // sub_rows))
    while sub_rows * sub_cols < k:
        sub_rows += 1
    r = torch.linspace(0, rows - 1, sub_rows).round().long()
    c = torch.linspace(0, cols - 1, sub_cols).round().long()
    grid = (r[:, None] * cols + c[None, :]).flatten().unique()
    pick = torch.linspace(0, grid.numel() - 1, k).round().long()
    return grid[pick].unique()
