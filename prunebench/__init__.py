"""prunebench: compare visual-token pruning strategies for VLA models on equal terms.

Public API for strategy authors: the interface (``Strategy``, ``StrategyConfig``, ``PrunePlan``,
``Stage``, ``Budget``, signal requests), the ``TokenLayout`` and ``hookimpl``.
"""

from prunebench.contract.errors import EngineError, PluginError, PrunebenchError, StrategyError
from prunebench.plugins.hookspecs import hookimpl
from prunebench.contract.interface import (BEFORE_LLM, EMBEDDINGS, PIXELS, Budget, EnvStep, EpisodeInfo,
                                  Observation, PrunePlan, QueryContext, SignalRequest, Signals, Stage,
                                  Strategy, StrategyConfig, attention, qk_logits, scale_layer)
from prunebench.contract.layout import TokenLayout, ViewSpan

__version__ = "0.1.0"

__all__ = [
    "BEFORE_LLM", "EMBEDDINGS", "PIXELS", "Budget", "EngineError", "EnvStep", "EpisodeInfo",
    "Observation", "PluginError", "PrunePlan", "PrunebenchError", "QueryContext", "SignalRequest",
    "Signals", "Stage", "Strategy", "StrategyConfig", "StrategyError", "TokenLayout", "ViewSpan",
    "attention", "hookimpl", "qk_logits", "scale_layer",
]
