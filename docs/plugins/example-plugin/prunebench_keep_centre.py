"""A complete third-party strategy: keep the visual tokens nearest each view's centre.

Install with ``pip install -e docs/plugins/example-plugin`` and it appears in
``prunebench plugins`` as ``keep-centre``.
"""

import torch
from pydantic import Field

import prunebench
from prunebench import BEFORE_LLM, Budget, PrunePlan, Stage, Strategy, StrategyConfig


class KeepCentreConfig(StrategyConfig):
    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of visual tokens kept")

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.1, 1.0))


class KeepCentre(Strategy):
    """Keeps the patches closest to the centre of each camera view."""

    name = "keep-centre"
    Config = KeepCentreConfig
    position_ids = "original"  # declare the position-id policy

    def schedule(self, ctx):
        return PrunePlan((Stage(BEFORE_LLM, Budget(keep_ratio=self.config.keep_ratio)),))

    def score(self, stage, signals, ctx):
        scores = []
        for view in ctx.layout.views:
            rows = torch.arange(view.rows).repeat_interleave(view.cols)
            cols = torch.arange(view.cols).repeat(view.rows)
            distance = (rows - (view.rows - 1) / 2) ** 2 + (cols - (view.cols - 1) / 2) ** 2
            scores.append(-distance.float())
        return torch.cat(scores)


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(KeepCentre)
