"""The documented import path of the selection helpers (``from prunebench.selection import top_k``);
they live in :mod:`prunebench.contract.selection`, with the rest of the strategy contract."""

from prunebench.contract.selection import (
                                           max_min_diverse,
                                           max_min_diverse_per_view,
                                           present_in_view,
                                           rank_in_view,
                                           top_k,
                                           top_k_per_view,
                                           top_k_under_budget,
                                           top_ks_per_view,
                                           uniform_grid,
                                           union,
)

__all__ = ["max_min_diverse", "max_min_diverse_per_view", "present_in_view", "rank_in_view", "top_k",
           "top_k_per_view", "top_k_under_budget", "top_ks_per_view", "uniform_grid", "union"]
