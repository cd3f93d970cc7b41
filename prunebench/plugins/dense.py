"""The dense baseline: every query runs the whole sequence, no token is removed.

It is part of the core, not a plugin: every comparison, speedup and action error is measured
against it, so disabling or replacing plugins can never take it away. The registry lists it under
the name ``none`` (its name on the command line and in study definitions).
"""

from __future__ import annotations

from prunebench.contract.strategy import Strategy, StrategyConfig

DENSE = "none"


class DenseConfig(StrategyConfig):
    """No parameters."""


class Dense(Strategy):
    """The dense baseline: no token is removed."""

    name = DENSE
    Config = DenseConfig
