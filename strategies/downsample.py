"""``downsample``: keep a uniform sub-grid of each view's patch grid (spatial downsampling).

VTC-Bench found plain downsampling beats many methods; like ``random`` it needs no signal.
"""

import torch

import prunebench
from prunebench import Budget, PrunePlan, Stage, Strategy
from strategies.common import KeepAtPointConfig
from prunebench.selection import uniform_grid


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
        layout = ctx.layout
        scores = torch.zeros(layout.n_visual)
        for v, quota in enumerate(stage.budget.quotas(layout)):
            view = layout.views[v]
            scores[uniform_grid(view.rows, view.cols, quota) + layout.visual_range(v).start] = 1.0
        return scores


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(Downsample)
