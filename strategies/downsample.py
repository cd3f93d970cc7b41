"""``downsample``: keep a uniform sub-grid of each view's patch grid (spatial downsampling).

VTC-Bench found plain downsampling beats many methods; like ``random`` it needs no signal.
"""

from functools import lru_cache

import torch

import prunebench
from prunebench import Budget, PrunePlan, Stage, Strategy
from prunebench.selection import uniform_grid
from prunebench.strategies.common import KeepAtPointConfig


class DownsampleConfig(KeepAtPointConfig):
    """Keep ratio and removal point."""


class Downsample(Strategy):
    """A uniform sub-grid of each view's patches (spatial downsampling)."""

    name = "downsample"
    Config = DownsampleConfig

    def schedule(self, ctx):
        budget = Budget(keep_ratio=self.config.keep_ratio, per_view=True)
        return PrunePlan((Stage(self.config.after_layer, budget),))

    def score(self, stage, signals, ctx):
        """1 on the evenly spaced grid points of each view's quota, 0 elsewhere."""
        return grid_scores(ctx.layout.views, tuple(stage.budget.quotas(ctx.layout))).clone()


@lru_cache(maxsize=64)
def grid_scores(views, quotas) -> torch.Tensor:
    """The same for every query of a layout and budget: computed once."""
    scores = []
    for view, quota in zip(views, quotas):
        s = torch.zeros(view.size)
        s[uniform_grid(view.rows, view.cols, quota)] = 1.0
        scores.append(s)
    return torch.cat(scores)


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(Downsample)
