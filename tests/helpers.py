"""Throwaway strategies for tests."""

from contextlib import contextmanager

import torch

import prunebench
from prunebench import BEFORE_LLM, Budget, PrunePlan, Stage, Strategy, StrategyConfig


class FixedPlan(Strategy):
    """Applies a given plan; keeps what ``keep_fn(stage, layout)`` returns (default: everything)."""

    name = "fixed-plan"

    def __init__(self, stages, signals=(), keep_fn=None, position_ids="original"):
        super().__init__(StrategyConfig())
        self.plan = PrunePlan(tuple(stages), tuple(signals))
        self.keep_fn = keep_fn
        self.position_ids = position_ids

    def schedule(self, ctx):
        return self.plan

    def score(self, stage, signals, ctx):
        return torch.zeros(ctx.layout.n_visual)

    def select(self, stage, scores, ctx, layout):
        if self.keep_fn is None:
            return layout.present_visual()
        return self.keep_fn(stage, layout)


def keep_all(point):
    return Stage(point, Budget(keep_ratio=1.0))


def first_k(k):
    return lambda stage, layout: layout.present_visual()[:k]


class StrategyPlugin:
    """A plugin object registering one strategy class."""

    def __init__(self, cls):
        self.cls = cls

    @prunebench.hookimpl
    def prunebench_register_strategies(self, register):
        register(self.cls)


@contextmanager
def registered(cls):
    """``cls`` registered in the global plugin manager for the duration of the block."""
    from prunebench.plugins.manager import MANAGER

    name = f"test-{cls.name}"
    MANAGER.register(StrategyPlugin(cls), name=name)
    try:
        yield
    finally:
        MANAGER.unregister(name)


__all__ = ["BEFORE_LLM", "FixedPlan", "keep_all", "first_k", "StrategyPlugin", "registered"]
