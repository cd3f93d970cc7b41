"""``downsample``: keep a uniform sub-grid of each view's patch grid (spatial downsampling).

VTC-Bench found plain downsampling beats many methods; like ``random`` it needs no signal.
"""

import torch
from pydantic import Field

import prunebench
from prunebench import BEFORE_LLM, Budget, PrunePlan, Stage, Strategy, StrategyConfig
from prunebench.selection import uniform_grid


class DownsampleConfig(StrategyConfig):
    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of visual tokens kept")
    after_layer: int = Field(BEFORE_LLM, ge=BEFORE_LLM, description="-1 = before the LLM")

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.1, 1.0),
                   after_layer=trial.suggest_int("after_layer", BEFORE_LLM, 3))


class Downsample(Strategy):
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
