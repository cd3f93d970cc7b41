"""The strategy contract: what a pruning strategy receives and returns.

A strategy answers three questions for every query:

* ``schedule(ctx)``: where and how much to prune now (a :class:`PrunePlan`), and which signals
  to compute; a plan with no stages is a dense query.
* ``score(stage, signals, ctx)``: importance of every visual token at that stage.
* ``select(stage, scores, ctx, layout)``: the visual indices to keep under the stage's budget.

Everything per token is indexed by *visual index* (0 .. n_visual-1, views in order); tokens that
are no longer in the sequence carry NaN in scores and signals. Strategies import only this module,
:mod:`prunebench.contract.layout` and :mod:`prunebench.contract.selection`; never the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunebench.contract.errors import MissingSignal
from prunebench.contract.layout import TokenLayout

if TYPE_CHECKING:  # pragma: no cover
    import optuna

BEFORE_LLM = -1
"""``Stage.after_layer`` value for a removal before the first decoder layer."""

REFERENCE_DEPTH = 32
"""Depth of the Llama-2-7B decoder in OpenVLA-OFT, which the papers' layer indices refer to."""

SIGNAL_KINDS = ("attention", "qk_logits", "embeddings", "pixels")


def scale_layer(paper_layer: int, n_layers: int, reference_depth: int = REFERENCE_DEPTH) -> int:
    """Map a layer index given for the 32-layer OFT decoder onto a model with ``n_layers``.

    Proportional, rounded half up, kept inside 0 .. n_layers-1 (e.g. 2 -> 1, 3 -> 1, 15 -> 4 on
    8 layers). Every strategy exposes its layers as config fields, so this default is overridable.
    """
    return min(n_layers - 1, max(0, int(paper_layer * n_layers / reference_depth + 0.5)))


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

    episode_index: int
    seed: int
    instruction: str = ""
    task: str = ""


def _engine_only(images: dict[str, np.ndarray]) -> torch.Tensor:
    raise RuntimeError("QueryContext.patch_pixels is provided by the engine: build contexts with "
                       "PruningEngine.context(observation, ...)")


@dataclass
class QueryContext:
    """Read-only inputs of one query. Histories are oldest first and exclude the current frame."""

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


# --------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class SignalRequest:
    """A signal the engine computes on demand, only at ``layer`` and only for the ``rows`` asked.

    kinds:
      attention   softmax attention probabilities rows -> every visual token at ``layer``, from
                  the q/k (with rotary) that layer computes (head- and row-averaged), on the
                  sequence as that layer sees it.
      qk_logits   layer-``layer`` q·k logits rows -> visual on the *input embeddings*: no rotary, no
                  softmax (ADP's retrieval weight); computed before any removal.
      embeddings  LLM input embeddings of the visual tokens, shape (n_visual, hidden).
      pixels      raw patch pixels of the current images after the model's preprocessing, shape
                  (n_visual, patch*patch*3), 0..255 (``QueryContext.patch_pixels`` gives them for
                  earlier frames).
    """

    kind: Literal["attention", "qk_logits", "embeddings", "pixels"]
    layer: int = 0
    rows: str = "text"

    @property
    def key(self) -> str:
        if self.kind in ("embeddings", "pixels"):
            return self.kind
        return f"{self.kind}@{self.layer}:{self.rows}"

    @property
    def before_llm(self) -> bool:
        """Input signals are ready before the first layer; attention needs its layer's input."""
        return self.kind != "attention"


def attention(layer: int, rows: str = "text") -> SignalRequest:
    return SignalRequest("attention", layer, rows)


def qk_logits(layer: int = 0, rows: str = "language") -> SignalRequest:
    return SignalRequest("qk_logits", layer, rows)


EMBEDDINGS = SignalRequest("embeddings")
PIXELS = SignalRequest("pixels")


class Budget(BaseModel):
    """How many visual tokens survive a stage: a keep ratio of the original visual tokens, or a count.

    ``per_view``: split the total across views (by ``view_weights``, default proportional to view
    size) so each view keeps its quota; otherwise one global top-k. Always *keep*, never prune.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    keep_ratio: float | None = Field(default=None, gt=0, le=1)
    keep_count: int | None = Field(default=None, ge=1)
    per_view: bool = True
    view_weights: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "Budget":
        if (self.keep_ratio is None) == (self.keep_count is None):
            raise ValueError("give exactly one of keep_ratio or keep_count")
        return self

    def total(self, layout: TokenLayout) -> int:
        if self.keep_count is not None:
            return self.keep_count
        return max(1, round(self.keep_ratio * layout.n_visual))

    def quotas(self, layout: TokenLayout) -> list[int]:
        """Per-view keep counts, clamped to what each view still has (largest-remainder split)."""
        total = self.total(layout)
        sizes = [v.size for v in layout.views]
        weights = list(self.view_weights or sizes)
        if len(weights) != len(sizes):
            raise ValueError(f"view_weights has {len(weights)} entries for {len(sizes)} views")
        shares = [total * w / sum(weights) for w in weights]
        quotas = [int(s) for s in shares]
        for i in sorted(range(len(shares)), key=lambda i: shares[i] - quotas[i], reverse=True):
            if sum(quotas) >= total:
                break
            quotas[i] += 1
        return [min(q, layout.n_present_visual(i)) for i, q in enumerate(quotas)]


@dataclass(frozen=True)
class Stage:
    """One removal: after decoder layer ``after_layer`` (``BEFORE_LLM`` = before layer 0)."""

    after_layer: int
    budget: Budget | None = None
    name: str = ""  # the strategy's own label ("static", "dynamic", ...), passed back to it

    @property
    def where(self) -> str:
        return "before_llm" if self.after_layer == BEFORE_LLM else f"after_layer_{self.after_layer}"


@dataclass(frozen=True)
class PrunePlan:
    """Stages in layer order, and the signals to compute (for stages and for ``on_forward_end``)."""

    stages: tuple[Stage, ...] = ()
    signals: tuple[SignalRequest, ...] = ()

    @classmethod
    def dense(cls, signals: tuple[SignalRequest, ...] = ()) -> "PrunePlan":
        return cls((), tuple(signals))

    @property
    def is_dense(self) -> bool:
        return not self.stages


class Signals:
    """Signals computed so far in this forward, by request key."""

    def __init__(self) -> None:
        self._values: dict[str, torch.Tensor] = {}

    def __setitem__(self, request: SignalRequest, value: torch.Tensor) -> None:
        self._values[request.key] = value

    def __getitem__(self, request: SignalRequest) -> torch.Tensor:
        try:
            return self._values[request.key]
        except KeyError:
            raise MissingSignal(f"signal {request.key} was not computed (yet): request it in the plan, "
                           "at a layer that has run before the stage that reads it") from None

    def __contains__(self, request: SignalRequest) -> bool:
        return request.key in self._values

    def keys(self) -> list[str]:
        return list(self._values)


# --------------------------------------------------------------------------- strategy
class StrategyConfig(BaseModel):
    """Base for strategy configs: frozen, unknown fields rejected, keep ratios only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def search_space(cls, trial: "optuna.Trial") -> "StrategyConfig":
        """Map an Optuna trial to a config. Default: nothing to search. Layer ranges of the built-in
        strategies fit the built-in 4-layer model; a study's ``space`` widens them for deeper models."""
        return cls()


class Strategy:
    """Base class of every token-selection strategy. Subclass, set ``name`` and ``Config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    position_ids: ClassVar[Literal["original", "recompact"]] = "original"
    """After a removal, keep each token's original RoPE position, or renumber 0..L'-1."""
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
        from prunebench.contract.selection import top_k_under_budget

        return top_k_under_budget(scores, stage.budget, layout)
