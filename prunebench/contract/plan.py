"""What a strategy asks of one query: where and how much to prune (``PrunePlan``, ``Stage``,
``Budget``) and which signals the engine computes for it (``SignalRequest``, ``Signals``).

Everything per token is indexed by *visual index* (0 .. n_visual-1, views in order); tokens no
longer in the sequence carry NaN in signals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunebench.contract.errors import MissingSignal
from prunebench.contract.layout import TokenLayout

BEFORE_LLM = -1
"""``Stage.after_layer`` value for a removal before the first decoder layer."""

REFERENCE_DEPTH = 32
"""Depth of the Llama-2-7B decoder in OpenVLA-OFT, which the papers' layer indices refer to."""

SIGNAL_KINDS = ("attention", "attention_entropy", "keys", "qk_logits", "embeddings", "row_embeddings", "pixels")


def scale_layer(paper_layer: int, n_layers: int, reference_depth: int = REFERENCE_DEPTH) -> int:
    """Map a layer index given for the 32-layer OFT decoder onto a model with ``n_layers``.

    Proportional, rounded half up, kept inside 0 .. n_layers-1 (e.g. 2 -> 1, 3 -> 1, 15 -> 4 on
    8 layers). Every strategy exposes its layers as config fields, so this default is overridable.
    """
    return min(n_layers - 1, max(0, int(paper_layer * n_layers / reference_depth + 0.5)))


# --------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class SignalRequest:
    """A signal the engine computes on demand, only at ``layer`` and only for the ``rows`` asked.

    kinds:
      attention   softmax attention probabilities rows -> every visual token at ``layer``, from
                  the q/k (with rotary) that layer computes (head- and row-averaged), on the
                  sequence as that layer sees it. ``per_row``: not averaged over rows, shape
                  (n_rows, n_visual), one row per present row token in sequence order.
      attention_entropy  the entropy (nats) of each ``rows`` token's head-mean attention over all
                  keys at ``layer``, averaged over the rows: shape (1,) (VLA-Cache's per-layer
                  attention entropy; ``rows="all"`` for every token).
      keys        the visual tokens' keys as layer ``layer`` computes them, before rotary, averaged
                  over heads: shape (n_visual, head_dim), NaN rows for absent tokens (ToMe's
                  similarity metric).
      qk_logits   layer-``layer`` q·k logits rows -> visual on the *input embeddings*: no rotary, no
                  softmax (ADP's retrieval weight); computed before any removal.
      embeddings  LLM input embeddings of the visual tokens, shape (n_visual, hidden).
      row_embeddings  LLM input embeddings of the ``rows`` tokens (e.g. the prompt), shape
                  (n_rows, hidden), from the unpruned input.
      pixels      raw patch pixels of the current images after the model's preprocessing, shape
                  (n_visual, patch*patch*3), 0..255 (``QueryContext.patch_pixels`` gives them for
                  earlier frames).
    """

    kind: Literal["attention", "attention_entropy", "keys", "qk_logits", "embeddings", "row_embeddings", "pixels"]
    layer: int = 0
    rows: str = "text"
    per_row: bool = False

    @property
    def key(self) -> str:
        if self.kind in ("embeddings", "pixels"):
            return self.kind
        if self.kind == "row_embeddings":
            return f"{self.kind}:{self.rows}"
        if self.kind == "keys":
            return f"{self.kind}@{self.layer}"
        return f"{self.kind}@{self.layer}:{self.rows}" + (":per_row" if self.per_row else "")

    @property
    def before_llm(self) -> bool:
        """Input signals are ready before the first layer; attention needs its layer's input."""
        return self.kind not in ("attention", "attention_entropy", "keys")

    @property
    def form(self) -> str:
        """What a layer-time signal computes: attention rows' mean (one row), per_row, entropy, or keys."""
        if self.kind == "keys":
            return "keys"
        return "entropy" if self.kind == "attention_entropy" else "per_row" if self.per_row else "mean"


def attention(layer: int, rows: str = "text", per_row: bool = False) -> SignalRequest:
    return SignalRequest("attention", layer, rows, per_row)


def attention_entropy(layer: int, rows: str = "all") -> SignalRequest:
    return SignalRequest("attention_entropy", layer, rows)


def visual_keys(layer: int) -> SignalRequest:
    return SignalRequest("keys", layer)


def row_embeddings(rows: str = "prompt") -> SignalRequest:
    return SignalRequest("row_embeddings", rows=rows)


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


VERBS = ("drop", "merge", "reuse")


@dataclass(frozen=True)
class Stage:
    """One removal: after decoder layer ``after_layer`` (``BEFORE_LLM`` = before layer 0).

    ``verb`` says what happens to the visual tokens ``select()`` does not keep (docs/engine.md):

    * ``drop`` (default): they leave the sequence.
    * ``merge``: they leave the sequence, folded into kept tokens: ``Strategy.assign()`` names, for
      each token it folds, the kept token and a weight (an :class:`Assignment`); the kept token's
      hidden state becomes the weighted mean, and it keeps its own position. Tokens the assignment
      does not name are dropped.
    * ``reuse``: they stop being computed (no query, no MLP) but are still attended to: at this and
      every later layer their keys and values come from the previous query's at the same original
      position (VLA-Cache). The strategy must set ``Strategy.reuses_kv``.
    """

    after_layer: int
    budget: Budget | None = None
    name: str = ""  # the strategy's own label ("static", "dynamic", ...), passed back to it
    verb: Literal["drop", "merge", "reuse"] = "drop"

    @property
    def where(self) -> str:
        return "before_llm" if self.after_layer == BEFORE_LLM else f"after_layer_{self.after_layer}"


@dataclass(frozen=True)
class Assignment:
    """Where a merge stage folds each removed visual token: ``removed[i]`` into the kept visual index
    ``into[i]`` with weight ``weight[i]`` (None: the token's size, i.e. how many original tokens it
    already holds; a kept token's own weight is always its size). ``removed`` names present visual
    tokens that ``select()`` did not keep, each at most once; those it does not name are dropped
    (SparseVLM recycles only some of the tokens it deletes)."""

    removed: torch.Tensor  # (r,) long, visual indices
    into: torch.Tensor  # (r,) long, kept visual indices
    weight: torch.Tensor | None = None  # (r,) float, > 0


@dataclass(frozen=True)
class PrunePlan:
    """Stages in layer order, and the signals to compute (for stages and for ``on_forward_end``).

    ``proportional_attention``: after a merge, each key's attention logit gains log(size) (ToMe's
    proportional attention, Bolya et al., arXiv 2210.09461), so a token holding s originals weighs
    like s of them."""

    stages: tuple[Stage, ...] = ()
    signals: tuple[SignalRequest, ...] = ()
    proportional_attention: bool = False

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
