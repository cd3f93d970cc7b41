"""``none``: the dense baseline. Every query runs the full sequence."""

import prunebench
from prunebench import Strategy, StrategyConfig


class DenseConfig(StrategyConfig):
    """No parameters."""


class Dense(Strategy):
    """The dense baseline: no token is removed."""

    name = "none"
    Config = DenseConfig


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(Dense)
