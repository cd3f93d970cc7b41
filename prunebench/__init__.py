"""prunebench: compare visual-token pruning strategies for VLA models on equal terms.

The public contract (the sub-package ``prunebench.contract``), re-exported here: for strategy
authors the interface (``Strategy``, ``StrategyConfig``, ``PrunePlan``, ``Stage``, ``Budget``, signal
requests), the ``TokenLayout`` and ``hookimpl``; for model authors ``VLAModel``, ``Encoded`` and
``ModelFamily``. docs/architecture.md draws the layers.
"""

from prunebench.contract.errors import EngineError, PluginError, PrunebenchError, StrategyError
from prunebench.contract.layout import TokenLayout, ViewSpan
from prunebench.contract.model import Encoded, ModelFamily, VLAModel
from prunebench.contract.plan import (
                                      BEFORE_LLM,
                                      EMBEDDINGS,
                                      PIXELS,
                                      Assignment,
                                      Budget,
                                      PrunePlan,
                                      SignalRequest,
                                      Signals,
                                      Stage,
                                      attention,
                                      attention_entropy,
                                      qk_logits,
                                      row_embeddings,
                                      scale_layer,
                                      visual_keys,
)
from prunebench.contract.strategy import EnvStep, EpisodeInfo, Observation, QueryContext, Strategy, StrategyConfig
from prunebench.plugins.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "BEFORE_LLM", "EMBEDDINGS", "PIXELS", "Assignment", "Budget", "EngineError", "EnvStep", "EpisodeInfo",
    "Observation", "PluginError", "PrunePlan", "PrunebenchError", "QueryContext", "SignalRequest",
    "Signals", "Stage", "Strategy", "StrategyConfig", "StrategyError", "TokenLayout", "ViewSpan",
    "attention", "attention_entropy", "hookimpl", "qk_logits", "row_embeddings", "scale_layer", "visual_keys",
    "Encoded", "ModelFamily", "VLAModel",
]
