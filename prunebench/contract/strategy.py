"""The strategy contract: what a pruning strategy receives and returns.

A strategy answers three questions for every query:

* ``schedule(ctx)``: where and how much to prune now (a :class:`~prunebench.contract.plan.PrunePlan`),
  and which signals to compute; a plan with no stages is a dense query.
* ``score(stage, signals, ctx)``: importance of every visual token at that stage.
* ``select(stage, scores, ctx, layout)``: the visual indices to keep under the stage's budget.

Everything per token is indexed by *visual index* (0 .. n_visual-1, views in order); tokens that
are no longer in the sequence carry NaN in scores and signals. Strategies import only the
``prunebench`` package's public names and :mod:`prunebench.selection`; never the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from prunebench.contract.errors import StrategyError
from prunebench.contract.layout import TokenLayout
from prunebench.contract.plan import Assignment, PrunePlan, Signals, Stage
from prunebench.contract.selection import top_k_under_budget

if TYPE_CHECKING:  # pragma: no cover
    import optuna

# --------------------------------------------------------------------------- inputs
@dataclass
class Observation:
    """What the policy sees at a query: camera images (uint8 HxWx3, by view name), proprio, text."""

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instruction: str


@dataclass
class EnvStep:
    """One executed environment step, as reported to strategies."""

    step_index: int  # env step in the episode (wait steps included)
    action: np.ndarray  # the 7-D action executed (unnormalised, as sent to the env)
    eef_pos: np.ndarray  # end-effector position after the step (m)
    eef_quat: np.ndarray | None = None
    actions_left_in_chunk: int = 0  # actions still queued from the current chunk


@dataclass
class EpisodeInfo:
    """Passed to ``on_episode_start``."""

    # identifies the episode for seeding: in closed loop a stable key of (suite, task, init state),
    # the same whichever run or shard plays it; on a stream, the stream's position
    episode_index: int
    seed: int
    instruction: str = ""
    task: str = ""


def _engine_only(images: dict[str, np.ndarray]) -> torch.Tensor:
    raise RuntimeError("QueryContext.patch_pixels is provided by the engine: build contexts with "
                       "PruningEngine.context(observation, ...)")


@dataclass
class QueryContext:
    """The inputs of one query (read-only for strategies). Histories are oldest first and exclude the
    current frame."""

    observation: Observation
    layout: TokenLayout  # original layout of this query (positions = all slots)
    n_layers: int
    query_index: int = 0  # model calls so far in this episode
    step_index: int = 0  # env step at which the query happens
    seed: int = 0  # derived from (run seed, episode, query): use it for any randomness
    # camera frames of the env steps just before this query: frames[-i] is i steps back, contiguous
    # (early re-queries included). Shorter than ``history_frames`` only near an episode's start
    # (the first query has none: the wait steps are not rendered).
    frames: list[dict[str, np.ndarray]] = field(default_factory=list)
    eef_history: list[np.ndarray] = field(default_factory=list)  # EEF position per past env step
    actions_since_last_query: list[np.ndarray] = field(default_factory=list)
    # patch_pixels(images) -> (n_visual, patch*patch*3) float, 0..255: the raw pixels of every visual
    # token's patch of a camera frame (``observation.images`` or one of ``frames``: view -> uint8
    # HxWx3), after the model's own preprocessing (resize; OpenVLA-OFT's centre crop) and on its own
    # patch grid, all views at once, rows in visual-index order. Set by the engine; the current
    # frame's value is the ``PIXELS`` signal and costs no second preprocessing. Do not modify it.
    patch_pixels: Callable[[dict[str, np.ndarray]], torch.Tensor] = field(default=_engine_only, repr=False)
    # set by the engine while the query runs: the layout at the stage being decided (after this
    # query's earlier removals; ``layout`` until the first) and the signals computed so far, so
    # ``score`` and ``select`` each see what they need without state kept on the strategy
    current_layout: TokenLayout | None = field(default=None, repr=False)
    signals: Signals = field(default_factory=Signals, repr=False)

    def __post_init__(self) -> None:
        if self.current_layout is None:
            self.current_layout = self.layout


# --------------------------------------------------------------------------- strategy
class StrategyConfig(BaseModel):
    """Base for strategy configs: frozen, unknown fields rejected, keep ratios only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def search_space(cls, trial: "optuna.Trial") -> "StrategyConfig":
        """Map an Optuna trial to a config. Default: nothing to search. ``trial.n_layers`` is the
        depth of the study's model, so layer ranges can fit a 4-layer and a 32-layer model alike
        (the built-in strategies search layers 0 .. n_layers/2, a study's ``space`` narrows them)."""
        return cls()


class Strategy:
    """Base class of every token-selection strategy. Subclass, set ``name`` and ``Config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    position_ids: ClassVar[Literal["original", "recompact"]] = "original"
    """After a removal, keep each token's original RoPE position, or renumber 0..L'-1."""
    reuses_kv: ClassVar[bool] = False
    """Keep every layer's keys and values of each query for the next one of the episode: needed by
    ``reuse`` stages (costs one copy of the keys and values per layer and query)."""
    history_frames: ClassVar[int] = 0
    """How many camera frames of the env steps before each query ``QueryContext.frames`` must hold;
    the closed loop renders those steps (besides the query steps), and every step when the strategy
    overrides ``on_env_step`` (it may re-query early: the frames before any step are then ready)."""

    def __init__(self, config: StrategyConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config(**config)
        self.config = config

    @property
    def label(self) -> str:
        """The name errors name: ``name``, else the class name (an unregistered strategy)."""
        return self.name or type(self).__name__

    # episode state -------------------------------------------------------------------------
    def on_episode_start(self, episode: EpisodeInfo) -> None:
        """Reset per-episode state (histories, controllers)."""

    def on_env_step(self, step: EnvStep) -> bool:
        """Called after every executed env step; return True to request a re-query now."""
        return False

    def on_forward_end(self, signals: Signals, record: Any) -> None:
        """Called after each forward with all computed signals and the query's accounting record."""

    # the three questions -------------------------------------------------------------------
    def schedule(self, ctx: QueryContext) -> PrunePlan:
        return PrunePlan.dense()

    def score(self, stage: Stage, signals: Signals, ctx: QueryContext) -> torch.Tensor:
        """Importance per visual index (shape n_visual; NaN for absent tokens)."""
        raise NotImplementedError(f"{type(self).__name__} schedules stages but has no score()")

    def select(self, stage: Stage, scores: torch.Tensor, ctx: QueryContext,
               layout: TokenLayout) -> torch.Tensor:
        """Visual indices to keep. Default: top-k of ``scores`` under the stage's budget."""
        if stage.budget is None:
            raise StrategyError(self.label, f"stage {stage.where} has no budget: give its Stage a "
                                            "Budget, or override select()")
        return top_k_under_budget(scores, stage.budget, layout)

    def assign(self, stage: Stage, keep: torch.Tensor, ctx: QueryContext,
               layout: TokenLayout) -> Assignment:
        """A ``merge`` stage only: which kept token each other present visual token folds into."""
        raise StrategyError(self.label, f"stage {stage.where} merges but the strategy has no assign()")
