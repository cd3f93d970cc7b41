import torch

from prunebench.interface import Budget
from prunebench.layout import TokenLayout
from prunebench.selection import max_min_diverse, top_k, top_k_under_budget, uniform_grid


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
