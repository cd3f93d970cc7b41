"""``fastv``: after layer K keep the visual tokens that receive the most attention.

FastV (Chen et al. 2024, arXiv 2403.06764): prune after layer K by attention received. The
original uses K=2 and the last token's row; VLA-Pruner's OFT fork uses K=3 with the mean over the
prefill rows (its default) or the STOP row, per view. Our default is the original: K=2 of 32
layers (scaled to the model's depth), the last row (STOP), per-view budget. The OFT-fork variant
is ``layer=<3 scaled>, rows=prefill``; it scores every prefill row (~150 on the built-in model,
~540 on OFT-7B) instead of one and costs more overhead (see benchmarks/README.md).
"""

from typing import Literal

from pydantic import Field

import prunebench
from prunebench import Budget, PrunePlan, Stage, Strategy, StrategyConfig, attention, scale_layer


class FastVConfig(StrategyConfig):
    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of visual tokens kept")
    layer: int | None = Field(None, ge=0, description="prune after this layer; None = 2 of 32, scaled")
    rows: Literal["last", "prefill", "text"] = Field("last", description="attention rows scored")
    per_view: bool = Field(True, description="per-view budget (OFT fork) or one global top-k")

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.1, 1.0),
                   layer=trial.suggest_int("layer", 0, trial.n_layers // 2),
                   rows=trial.suggest_categorical("rows", ["last", "prefill", "text"]))


class FastV(Strategy):
    """Top-k visual tokens by attention received at layer K, removed after K."""

    name = "fastv"
    Config = FastVConfig

    def _layer(self, n_layers: int) -> int:
        return self.config.layer if self.config.layer is not None else scale_layer(2, n_layers)

    def schedule(self, ctx):
        layer = self._layer(ctx.n_layers)
        budget = Budget(keep_ratio=self.config.keep_ratio, per_view=self.config.per_view)
        return PrunePlan((Stage(layer, budget),), signals=(attention(layer, self.config.rows),))

    def score(self, stage, signals, ctx):
        return signals[attention(stage.after_layer, self.config.rows)]


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(FastV)
