"""``random``: a uniformly random subset of each view's tokens, seeded per (run, episode, query).

UniPruneBench found random pruning a strong baseline; it is the floor every method must beat.
"""

import torch
from pydantic import Field

import prunebench
from prunebench import BEFORE_LLM, Budget, PrunePlan, Stage, Strategy, StrategyConfig


class RandomConfig(StrategyConfig):
    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of visual tokens kept")
    after_layer: int = Field(BEFORE_LLM, ge=BEFORE_LLM, description="-1 = before the LLM")
    per_view: bool = Field(True, description="split the budget across views by size")

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.1, 1.0),
                   after_layer=trial.suggest_int("after_layer", BEFORE_LLM, 3))


class RandomPruning(Strategy):
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
