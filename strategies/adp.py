"""``adp``: Action-aware Dynamic Pruning (Pei et al., arXiv 2509.22093, ICLR 2026).

Before the LLM, keep the visual tokens with the highest text->vision *retrieval weight*: layer-0
query-key logits of the language tokens (BOS, prompt, STOP) against the visual tokens, on the
input embeddings, without rotary and without softmax, averaged over heads and rows. The budget
round(n_visual x keep_ratio) is split 0.4 / 0.6 between the primary and the wrist camera. Position
ids are recompacted (0..L'-1), as the release does.

A trajectory gate decides per action chunk between pruned and dense: the net end-effector
displacement d over the chunk just executed is compared with the two chunks before it; d >= both
-> prune (coarse motion), d < both -> dense (fine motion), in between -> prune. The first 3 chunks
are dense; at most 3 pruned chunks in a row, then one dense.

Differences from the release (TerryPei/VLA-ADP@9a86145, chen7086/VLA-ADP@d7094b0): the action
hidden states are read with the engine's one convention (OFT's shifted slice), not at the 56
placeholders; the gate reads the end-effector positions the env reports after every step (the
first window has 8 poses, not 9, since the wait steps are not policy steps); per-camera rounding
is largest-remainder; qk layers > 0 (an ablation needing a probe forward) are not offered.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

import prunebench
from prunebench import BEFORE_LLM, Budget, PrunePlan, Stage, Strategy, StrategyConfig, qk_logits

PRUNED, DENSE = 1, 0


class ADPConfig(StrategyConfig):
    keep_ratio: float = Field(0.3, gt=0, le=1, description="share of visual tokens kept (paper's 30% row)")
    split: tuple[float, ...] = Field((0.4, 0.6), description="budget share per camera (primary, wrist)")
    gate: bool = Field(True, description="trajectory gate; False = prune every query ('static' ablation)")
    extrema_window: int = Field(3, ge=2, description="compare with the previous extrema_window-1 chunks")
    max_consecutive_pruned: int = Field(3, ge=0, description="then one dense chunk; 0 = no limit")
    in_between: Literal["prune", "keep_state"] = Field("prune", description="d between the extrema")
    displacement: Literal["net", "arc"] = Field("net", description="|p_last - p_first| or path length")

    @classmethod
    def search_space(cls, trial):
        primary = trial.suggest_float("split_primary", 0.2, 0.8)
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.1, 0.9), split=(primary, 1 - primary),
                   extrema_window=trial.suggest_int("extrema_window", 2, 6),
                   max_consecutive_pruned=trial.suggest_int("max_consecutive_pruned", 0, 6))


class TrajectoryGate:
    """ADP's window gate: one decision per executed chunk from its end-effector displacement."""

    def __init__(self, config: ADPConfig) -> None:
        self.config = config
        self.displacements: list[float] = []
        self.state = DENSE
        self.streak = 0

    def update(self, d: float) -> int:
        c = self.config
        self.displacements.append(d)
        window = max(3, c.extrema_window)
        if len(self.displacements) < window:
            nxt = DENSE
        else:
            previous = self.displacements[-window:-1]
            if d >= max(previous):
                nxt = PRUNED
            elif d < min(previous):
                nxt = DENSE
            else:
                nxt = self.state if c.in_between == "keep_state" else PRUNED
        if c.max_consecutive_pruned:
            if nxt == PRUNED:
                if self.streak >= c.max_consecutive_pruned:
                    nxt, self.streak = DENSE, 0
                else:
                    self.streak += 1
            else:
                self.streak = 0
        self.state = nxt
        return nxt


def displacement(poses: list[np.ndarray], kind: str = "net") -> float:
    if len(poses) < 2:
        return 0.0
    p = np.asarray(poses, dtype=np.float64)
    if kind == "net":
        return float(np.linalg.norm(p[-1] - p[0]))
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())


class ADP(Strategy):
    """ADP: layer-0 q.k retrieval weight before the LLM, gated by end-effector motion per chunk."""

    name = "adp"
    Config = ADPConfig
    position_ids = "recompact"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.gate = TrajectoryGate(self.config)

    def on_episode_start(self, episode) -> None:
        self.gate = TrajectoryGate(self.config)

    def schedule(self, ctx):
        c = self.config
        if ctx.query_index > 0 and c.gate:  # the chunk just executed decides this one
            n = len(ctx.actions_since_last_query)
            poses = ctx.eef_history[-(n + 1):] if n else []
            self.gate.update(displacement(poses, c.displacement))
        if c.gate and self.gate.state == DENSE:
            return PrunePlan.dense()
        budget = Budget(keep_ratio=c.keep_ratio, per_view=True, view_weights=c.split)
        return PrunePlan((Stage(BEFORE_LLM, budget),), (qk_logits(0, "language"),))

    def score(self, stage, signals, ctx):
        return signals[qk_logits(0, "language")]


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(ADP)
