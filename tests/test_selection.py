import torch

from prunebench.contract.layout import TokenLayout
from prunebench.contract.plan import Budget
from prunebench.contract.selection import (
    max_min_diverse,
    max_min_diverse_per_view,
    rank_in_view,
    top_k,
    top_k_per_view,
    top_k_under_budget,
    uniform_grid,
)


def two_views(rows=2, cols=4):
    return TokenLayout.build([("a", rows, cols), ("b", rows, cols)], 1, 4, 1, 1, 2)


def test_top_k_ignores_nan_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, float("nan"), 0.5, 0.9])
    assert top_k(scores, 2, torch.arange(4)).tolist() == [0, 3]


def test_per_view_quotas_follow_weights():
    lay = two_views()
    assert Budget(keep_count=5, view_weights=(0.4, 0.6)).quotas(lay) == [2, 3]
    assert Budget(keep_ratio=0.5).quotas(lay) == [4, 4]
    scores = torch.arange(16, dtype=torch.float)  # view b scores higher everywhere
    assert top_k_under_budget(scores, Budget(keep_ratio=0.25), lay).tolist() == [6, 7, 14, 15]
    assert top_k_under_budget(scores, Budget(keep_ratio=0.25, per_view=False), lay).tolist() == [12, 13, 14, 15]


def test_max_min_diverse_picks_spread_points():
    # visual tokens 0..3 on a line; 0 and 1 nearly identical
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.05]])
    chosen = max_min_diverse(torch.tensor([0, 1, 2, 3]), feats, 3)
    assert len(chosen) == 3 and not {0, 1} <= set(chosen.tolist())


def test_uniform_grid_spreads_evenly():
    assert uniform_grid(4, 4, 4).tolist() == [0, 3, 12, 15]
    assert len(uniform_grid(12, 12, 72)) == 72
    assert uniform_grid(3, 3, 9).tolist() == list(range(9))


def _per_view_reference(scores, quotas, layout, among):
    """The per-view loop the vectorised selectors replace."""
    parts = []
    for v, q in enumerate(quotas):
        r = layout.visual_range(v)
        parts.append(top_k(scores, q, among[(among >= r.start) & (among < r.stop)]))
    return torch.cat(parts)


def test_top_k_per_view_equals_a_top_k_in_each_view():
    lay = TokenLayout.build([("a", 4, 4), ("b", 3, 5), ("c", 2, 2)], 1, 4, 1, 1, 2)
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        scores = torch.randint(0, 5, (lay.n_visual,), generator=gen).float()  # many ties
        scores[torch.rand(lay.n_visual, generator=gen) < 0.2] = float("nan")
        among = torch.nonzero(torch.rand(lay.n_visual, generator=gen) < 0.7, as_tuple=True)[0]
        quotas = torch.randint(0, 8, (3,), generator=gen).tolist()
        expected = _per_view_reference(scores, quotas, lay, among)
        assert top_k_per_view(scores, quotas, lay, among=among).tolist() == expected.tolist()
        ranks = rank_in_view(scores, lay, among)
        assert (ranks[~torch.isin(torch.arange(lay.n_visual), among)] == lay.n_visual).all()


def _max_min_reference(candidates, features, k):
    """VLA-Pruner's greedy filter, one view, one candidate per step (the previous implementation)."""
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


def test_max_min_diverse_per_view_equals_the_greedy_filter_in_each_view():
    lay = two_views(4, 8)
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        features = torch.randn(lay.n_visual, 6, generator=gen)
        candidates = torch.nonzero(torch.rand(lay.n_visual, generator=gen) < 0.6, as_tuple=True)[0]
        quotas = torch.randint(1, 14, (2,), generator=gen).tolist()
        expected = torch.cat([_max_min_reference(candidates[(candidates >= r.start) & (candidates < r.stop)],
                                                 features, q)
                              for q, r in zip(quotas, (lay.visual_range(0), lay.visual_range(1)))])
        assert max_min_diverse_per_view(candidates, features, quotas, lay).tolist() == expected.tolist()
        k = quotas[0]
        expected = _max_min_reference(candidates, features, k)
        assert max_min_diverse(candidates, features, k).tolist() == expected.tolist()
