"""``random``: a uniformly random subset of each view's tokens, seeded per (run, episode, query).

UniPruneBench found random pruning a strong baseline; it is the floor every method must beat.
"""

import torch
from pydantic import Field

import prunebench
from prunebench import Budget, PrunePlan, Stage, Strategy
from prunebench.strategies.common import KeepAtPointConfig


class RandomConfig(KeepAtPointConfig):
    per_view: bool = Field(True, description="split the budget across views by size")


class RandomPruning(Strategy):
    """Uniformly random visual tokens, per view, seeded per (run, episode, query)."""

    name = "random"
    Config = RandomConfig

    def schedule(self, ctx):
        budget = Budget(keep_ratio=self.config.keep_ratio, per_view=self.config.per_view)
        return PrunePlan((Stage(self.config.after_layer, budget),))

    def score(self, stage, signals, ctx):
        generator = torch.Generator().manual_seed(ctx.seed)
        return torch.rand(ctx.layout.n_visual, generator=generator)


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(RandomPruning)
