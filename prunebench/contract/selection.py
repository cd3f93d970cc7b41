"""Selectors: turn per-visual-token scores into a keep-set (visual indices, sorted).

Shared by every strategy, so top-k, per-view quotas, unions and diversity are written once.
Per-view selections rank every view in the same tensor ops (no Python loop over tokens; per view
only a slice of the ranked run).
"""

from __future__ import annotations

import numpy as np
import torch

from prunebench.contract.layout import TokenLayout
from prunebench.contract.plan import Budget


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` without a call (inference mode dispatches even a no-op conversion)."""
    return x if x.dtype == torch.float32 else x.float()


def top_k(scores: torch.Tensor, k: int, among: torch.Tensor, ordered: bool = False) -> torch.Tensor:
    """The ``k`` highest-scoring visual indices from ``among`` (ties broken by lower index), sorted
    by index, or best first when ``ordered``."""
    k = min(k, int(among.numel()))
    if k <= 0:
        return among[:0]
    values = _float(scores[among]).nan_to_num(nan=float("-inf"))
    # stable: sort by descending score, then ascending index
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    return among[order] if ordered else torch.sort(among[order]).values


def present_in_view(layout: TokenLayout, view: int) -> torch.Tensor:
    present = layout.present_visual()
    r = layout.visual_range(view)
    return present[(present >= r.start) & (present < r.stop)]


def _by_view(scores: torch.Tensor, layout: TokenLayout,
             among: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    """The ``among`` indices (sorted; default: the present ones) grouped by view, best first within
    each (descending score, NaN last, ties by lower index), and where each view's run starts (one
    entry per view, then the total)."""
    if among is None:
        among = layout.present_visual()
        bounds = layout.view_slot_bounds()
        starts = [b - bounds[0] for b in bounds]
    else:  # views are contiguous runs of visual indices, so of the sorted ``among``
        starts = torch.searchsorted(among, layout.view_visual_bounds()).tolist()
    values = _float(scores[among]).nan_to_num(nan=float("-inf"))
    ranked = among[torch.sort(values, descending=True, stable=True).indices]  # best first
    grouped = ranked[torch.sort(layout.view_of_visual()[ranked], stable=True).indices]
    return grouped, starts


def rank_in_view(scores: torch.Tensor, layout: TokenLayout,
                 among: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of every visual index within its view among the ``among`` indices (sorted; default:
    the present ones) by descending score (0 = best; NaN ranks last; ties broken by lower index,
    as ``top_k``); ``n_visual`` for indices not in ``among``."""
    grouped, starts = _by_view(scores, layout, among)
    ranks = torch.full((layout.n_visual,), layout.n_visual, dtype=torch.long)
    ranks[grouped] = torch.cat([torch.arange(b - a) for a, b in zip(starts, starts[1:])])
    return ranks


def top_k_per_view(scores: torch.Tensor, quotas, layout: TokenLayout,
                   among: torch.Tensor | None = None) -> torch.Tensor:
    """In every view ``v``, the ``quotas[v]`` highest-scoring of the ``among`` indices (sorted;
    default: the present ones) in that view, as ``top_k`` per view; sorted by index."""
    return top_ks_per_view(scores, [quotas], layout, among)[0]


def top_ks_per_view(scores: torch.Tensor, quotas_list, layout: TokenLayout,
                    among: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``top_k_per_view`` for several quota lists of the same scores, ranking them once."""
    grouped, starts = _by_view(scores, layout, among)
    return [torch.sort(torch.cat([grouped[a:min(b, a + int(q))]
                                  for a, b, q in zip(starts, starts[1:], quotas)])).values
            for quotas in quotas_list]


def top_k_under_budget(scores: torch.Tensor, budget: Budget, layout: TokenLayout,
                       force_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k under a budget (per view or global); ``force_keep`` indices are kept on top of it."""
    if budget.per_view:
        keep = top_k_per_view(scores, budget.quotas(layout), layout)
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
    groups = torch.zeros(candidates.numel(), dtype=torch.long)
    return _farthest_points(candidates, features, groups, torch.tensor([k]))


def max_min_diverse_per_view(candidates: torch.Tensor, features: torch.Tensor, quotas,
                             layout: TokenLayout) -> torch.Tensor:
    """``max_min_diverse`` in every view at once: ``quotas[v]`` of view v's candidates (all of
    them when it has no more), each view on its own; sorted by index."""
    views = layout.view_of_visual()[candidates]
    return _farthest_points(candidates, features, views, torch.as_tensor(quotas, dtype=torch.long))


def _farthest_points(candidates: torch.Tensor, features: torch.Tensor, groups: torch.Tensor,
                     k: torch.Tensor) -> torch.Tensor:
    """Greedy max-min selection of ``k[g]`` candidates within each group ``g`` (``groups``: the
    group of each candidate), all groups in the same tensor ops. Sequential over the picks only:
    each step is one argmax and one minimum over every candidate."""
    candidates = candidates.long()
    n_groups = k.numel()
    member = groups[None, :] == torch.arange(n_groups)[:, None]  # (groups, candidates)
    size = member.sum(dim=1)
    if bool((size <= k).all()):
        return torch.sort(candidates).values
    f = torch.nn.functional.normalize(_float(features[candidates]), dim=-1)
    dist = 1.0 - f @ f.T
    # start: in each group, the candidate farthest from its nearest neighbour in the group
    nearest = dist.masked_fill(groups[:, None] != groups[None, :], float("inf"))
    nearest.fill_diagonal_(float("inf"))
    isolation = nearest.min(dim=0).values
    pick = torch.where(member, isolation, float("-inf")).argmax(dim=1)  # (groups,); first on ties
    filtering = size > k
    # closest[g, c]: distance from candidate c to the nearest chosen one in group g; -inf outside g
    closest = torch.where(member, float("inf"), float("-inf"))
    # a chosen candidate is never chosen again: its own "distance" -1 (cosine distances are >= 0)
    # marks it in the same minimum that takes it into account
    dist.fill_diagonal_(-1.0)
    # the picks run in NumPy on the host: a NumPy call on a (groups x candidates) array costs a
    # fraction of a tensor op's dispatch, and the keep-set is needed on the host anyway
    dist_np, closest_np, pick_np = dist.cpu().numpy(), closest.cpu().numpy(), pick.cpu().numpy()
    picks = [pick_np]
    for _ in range(1, int(k[filtering].max())):
        np.minimum(closest_np, dist_np[pick_np], out=closest_np)
        pick_np = closest_np.argmax(axis=1)  # first on ties, as torch.argmax
        picks.append(pick_np)
    # the first k[g] picks of every group that needs filtering; the others keep every candidate
    wanted = (torch.arange(len(picks))[:, None] < k) & filtering
    chosen = ~filtering[groups]
    chosen[torch.from_numpy(np.stack(picks))[wanted]] = True
    return torch.sort(candidates[chosen]).values


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
