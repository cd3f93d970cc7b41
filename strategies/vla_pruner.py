"""``vla-pruner``: VLA-Pruner (Liu et al., arXiv 2511.16449), as in its OpenVLA-OFT release.

Per view, after layer K (3 of 32): the union of the top-k tokens by *semantic* importance
(prefill rows -> vision attention at layer K) and the top-k by *action* importance (action rows ->
vision attention at layer l_act = 15 of 32 over the previous w = 3 queries, smoothed with decay
0.8, newest weighted most; pruned tokens count 0), then a max-min diversity filter on the LLM
input embeddings back to k. The first w queries of an episode run dense to fill the history.
Original position ids are kept.

Differences from the release (MINT-SJTU/VLA-Pruner, OFT files at 3d156ee/38441a4): attention
rows are computed only where needed (the release runs eager attention on every layer); the
keep ratio is a *keep* ratio (the release's ``fastv_r`` prunes); the OpenVLA release's reversed
decay (issue #7) is reproducible with ``release_oldest_weighted_most``; reading the action rows of
the current query at layer K instead of the history is ``current_action_attention``.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch
from pydantic import Field

import prunebench
from prunebench import EMBEDDINGS, Budget, PrunePlan, Stage, Strategy, StrategyConfig, attention, scale_layer
from prunebench.selection import max_min_diverse_per_view, top_k_per_view, union


class VLAPrunerConfig(StrategyConfig):
    keep_ratio: float = Field(0.25, gt=0, le=1, description="share of each view kept (scripts: 0.25/0.125/0.0725)")
    prune_layer: int | None = Field(None, ge=0, description="prune after this layer; None = 3 of 32, scaled")
    action_layer: int | None = Field(None, ge=0, description="action-attention layer; None = 15 of 32, scaled")
    window: int = Field(3, ge=1, description="queries in the action-attention history (and dense warm-up)")
    decay: float = Field(0.8, gt=0, le=1, description="history weight per query of age")
    rows: Literal["prefill", "last", "text"] = Field("prefill", description="semantic attention rows")
    mode: Literal["semantic_action", "semantic", "action"] = Field("semantic_action")
    diversity: bool = Field(True, description="max-min diversity filter back to the budget")
    current_action_attention: bool = Field(False, description="use this query's layer-K action rows")
    release_oldest_weighted_most: bool = Field(False, description="the OpenVLA release's decay bug (#7)")

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.05, 0.75),
                   prune_layer=trial.suggest_int("prune_layer", 0, trial.n_layers // 2),
                   action_layer=trial.suggest_int("action_layer", 1, trial.n_layers - 1),
                   window=trial.suggest_int("window", 1, 5),
                   decay=trial.suggest_float("decay", 0.3, 1.0))


def smooth(history: list[torch.Tensor], decay: float, oldest_first: bool = False) -> torch.Tensor:
    """Weighted mean of the history (oldest first in the list): the newest gets decay**0."""
    n = len(history)
    weights = torch.tensor([decay ** (n - 1 - i) for i in range(n)])  # oldest .. newest
    if oldest_first:
        weights = weights.flip(0)
    stacked = torch.stack(history)
    return (weights[:, None] * stacked).sum(0) / weights.sum()


class VLAPruner(Strategy):
    """VLA-Pruner: semantic (prefill) + smoothed action attention, union, then max-min diversity."""

    name = "vla-pruner"
    Config = VLAPrunerConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.history: deque = deque(maxlen=self.config.window)

    def on_episode_start(self, episode) -> None:
        self.history.clear()

    def _layers(self, n_layers: int) -> tuple[int, int]:
        c = self.config
        k = c.prune_layer if c.prune_layer is not None else scale_layer(3, n_layers)
        a = c.action_layer if c.action_layer is not None else scale_layer(15, n_layers)
        return min(k, n_layers - 2), min(a, n_layers - 1)

    def schedule(self, ctx):
        layer, act_layer = self._layers(ctx.n_layers)
        record = attention(act_layer, "action")
        if len(self.history) < self.config.window:  # dense warm-up fills the history
            return PrunePlan.dense(signals=(record,))
        signals = [attention(layer, self.config.rows), EMBEDDINGS, record]
        if self.config.current_action_attention:
            signals.append(attention(layer, "action"))
        budget = Budget(keep_ratio=self.config.keep_ratio, per_view=True)
        return PrunePlan((Stage(layer, budget),), tuple(dict.fromkeys(signals)))

    def score(self, stage, signals, ctx):
        """Semantic scores (``select`` reads the action scores and embeddings itself)."""
        return signals[attention(stage.after_layer, self.config.rows)]

    def select(self, stage, scores, ctx, layout):
        """Per view (all views at once): union of the top-k sets, then back to k."""
        c = self.config
        quotas = stage.budget.quotas(layout)
        sets = []
        if c.mode != "action":
            sets.append(top_k_per_view(scores, quotas, layout))
        if c.mode != "semantic":
            if c.current_action_attention:
                action = ctx.signals[attention(stage.after_layer, "action")]
            else:
                action = smooth(list(self.history), c.decay, c.release_oldest_weighted_most)
            sets.append(top_k_per_view(action, quotas, layout))
        candidates = union(*sets)
        if c.diversity:
            return max_min_diverse_per_view(candidates, ctx.signals[EMBEDDINGS], quotas, layout)
        return top_k_per_view(scores, quotas, layout, among=candidates)  # semantic scores decide

    def on_forward_end(self, signals, record) -> None:
        _, act_layer = self._layers(len(record.tokens_per_layer))
        self.history.append(torch.nan_to_num(signals[attention(act_layer, "action")], nan=0.0))


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(VLAPruner)
