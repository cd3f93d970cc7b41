"""``tome``: Token Merging, ToMe (Bolya et al., ICLR 2023, arXiv 2210.09461,
https://arxiv.org/abs/2210.09461), on the visual tokens of the LLM decoder.

ToMe is the project's first *merging* method: the tokens it removes are not dropped but folded,
by a size-weighted average, into the tokens that stay (a ``merge`` stage, docs/engine.md). At each
merge layer, within each camera view:

1. the view's present visual tokens are split alternately into two sets, B and A (visual-index
   order: the 1st, 3rd, ... token are B, the 2nd, 4th, ... are A);
2. the similarity of two tokens is the cosine of their keys at that layer, averaged over heads
   (the ``visual_keys(l)`` signal: rotary undone);
3. every A token draws one edge, to its most similar B token (the first B token on ties);
4. the r most similar edges are merged: each of those A tokens is folded into its B token by the
   size-weighted mean (``Assignment`` with weight None: each token's size, how many original
   tokens it holds), the others stay; r is capped at the number of A tokens (at most half the
   view), as in the release;
5. from the first merge on, every key's attention logit gains log(size), ToMe's *proportional
   attention* (``PrunePlan.proportional_attention``), so a token holding s originals weighs like s
   of them.

What we read in the release (https://github.com/facebookresearch/ToMe,
``facebookresearch/ToMe@af95e4b``): ``tome/merge.py`` ``bipartite_soft_matching`` (L2-normalised
metric, ``a, b = metric[..., ::2, :], metric[..., 1::2, :]``, ``scores.max(dim=-1)`` for each A
token's edge, ``argsort(descending=True)`` of the edge scores, the first r are merged, r capped at
``(tokens - protected) // 2``; a class token at index 0 gets a row of -inf so it is never merged,
a distillation token at index 1 a column of -inf so nothing merges into it; the merged sequence is
the unmerged A tokens followed by all B tokens, the unmerged A tokens re-sorted into their order
when there is a class token) and ``merge_wavg`` (sum of x*size and of size, then divide);
``tome/patch/timm.py`` ``ToMeBlock`` / ``ToMeAttention`` (the metric is ``k.mean(1)``, the keys of
the block's own attention averaged over heads; the merge sits between the attention and the MLP;
proportional attention adds ``size.log()`` to the logits of every key; ``apply_patch`` defaults to
``prop_attn=True``; the MAE patch defaults to False for off-the-shelf MAE models);
``tome/utils.py`` ``parse_r`` (an int r is a constant r at every block; ``(r, inflect)`` a linear
trend from ``int(r * (1 - inflect))`` to ``2r - int(r * (1 - inflect))``; a list is r per block).

Defaults and where they come from:

* ``keep_ratio = 0.5``: the share of each view's visual tokens left after the *last* merge, as for
  the other strategies' budgets (``Budget(keep_ratio, per_view)`` quotas). The n - keep removals of
  a view are spread over the merge layers along ``parse_r``'s trend (``inflect = 0``, the release's
  constant r: equal counts, cumulative rounding so that they add up exactly). ``r`` (tokens merged
  per merge layer in each view, ToMe's own budget, ``parse_r`` of ``(r, inflect)``) replaces it.
* merge layers: after every layer from 2 of 32 (``prunebench.scale_layer``; 0 on the 4-layer
  built-in model) to the second to last (the last layer a merge can still act on). The release
  merges in every block, with a constant r; ours starts at FastV's K = 2 (the LLM's first two
  layers spread their attention over every token, and ``fastv`` prunes at the same point, so
  both start from the same dense prefix). ``first_layer=0`` is the release's every-layer schedule.
  OpenVLA-OFT: 29 merges of 4 or 5 tokens per view (256 -> 128 each); built-in model: 3 merges
  of 11, 10, 11 per view (64 -> 32 each).
* ``per_view = True``: ToMe matches the tokens of one image; OpenVLA-OFT's two cameras are two
  images, so a token never merges with the other camera's (``per_view=false``: one pool).
* ``proportional_attention = True``: ``apply_patch``'s default for timm models evaluated off the
  shelf, which is what a pretrained VLA is here.

Differences from the release (see docs/strategies.md):

* **Where the merge happens.** After the whole layer l (after its MLP), with layer l's keys; the
  release merges between a block's attention and its MLP. The contract's stages sit between
  layers, so the MLP of layer l still runs on the unmerged tokens.
* **Metric.** The keys of an LLM layer, rotary undone (``visual_keys``), averaged over the (KV)
  heads; the release's ViT keys carry no position. A zero key has cosine 0 with every token (the
  release divides by its zero norm).
* **Protected tokens.** Every non-visual token (BOS, proprio, prompt, action slots, STOP) is outside
  the matching: never merged, never a destination; the release protects its class (and
  distillation) token. The first patch of a view is a B token, as in the release's class-token
  models, where the class token at index 0 takes the first A place (on OpenVLA-OFT, BOS holds
  that place in front of the first view).
* **Positions.** A merged token keeps its B token's original position (the contract's rule: its
  rotary is a real token's); in a ViT the position embedding, added once at the input, is averaged
  with the rest.
* **Order of tokens.** The release returns the unmerged A tokens, then the B tokens, and the next
  block alternates A/B over that order; ours alternates over the present tokens in visual-index
  (raster) order at every layer, the sequence order the engine keeps. ``release_order=true``
  reproduces the release's order (the class-token case: unmerged A in their order, then B).
* **Ties.** Edges of equal similarity are merged in the order of their A tokens (a stable sort;
  the release's ``argsort`` leaves their order unspecified).
* **Budget.** A ``keep_ratio`` besides ToMe's r (above). Each merge removes at most the view's A
  tokens (half of it, rounded down), as in the release, with no carry-over: a keep ratio below
  0.5 ** (number of merges) is not reached.

Why ToMe and not TTF-VLA (temporal token fusion, arXiv 2508.19257): a merge stage folds removed
tokens into kept ones within one query, which is spatial merging exactly; TTF-VLA replaces current
tokens by the previous frame's, which is not a merge (closer to ``reuse``).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

import prunebench
from prunebench import Assignment, Budget, PrunePlan, Stage, Strategy, StrategyConfig, scale_layer, visual_keys

FIRST_LAYER = 2  # of 32: FastV's K, where ``fastv`` prunes too


class ToMeConfig(StrategyConfig):
    keep_ratio: float = Field(0.5, gt=0, le=1,
                              description="share of each view's visual tokens left after the last merge")
    r: int | None = Field(None, ge=0, description="tokens merged per merge layer in each view (per_view=false: "
                                                  "in the one pool); ToMe's r; replaces keep_ratio")
    inflect: float = Field(0.0, ge=-1, le=1, description="trend of the per-layer counts (ToMe's parse_r): "
                                                         "0 constant, -1 decreasing, +1 increasing")
    first_layer: int | None = Field(None, ge=0, description="first merge after this layer; None = 2 of 32, scaled")
    last_layer: int | None = Field(None, ge=0, description="last merge after this layer; None = n_layers - 2")
    per_view: bool = Field(True, description="match within each camera view; False = one pool")
    proportional_attention: bool = Field(True, description="attention logits + log(size) (ToMe's default)")
    release_order: bool = Field(False, description="alternate A/B over the release's token order after a "
                                                   "merge (unmerged A, then B) instead of raster order")

    @model_validator(mode="after")
    def _one_budget(self) -> "ToMeConfig":
        if self.r is not None and "keep_ratio" in self.model_fields_set:
            raise ValueError("give keep_ratio or r, not both")
        if self.first_layer is not None and self.last_layer is not None and self.first_layer > self.last_layer:
            raise ValueError("first_layer is after last_layer")
        return self

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.1, 1.0),
                   first_layer=trial.suggest_int("first_layer", 0, trial.n_layers // 2),
                   inflect=trial.suggest_float("inflect", -1.0, 1.0),
                   proportional_attention=trial.suggest_categorical("proportional_attention", [True, False]))


# ----------------------------------------------------------------------------- the pieces
def parse_r(r: int, inflect: float, n_stages: int) -> list[int]:
    """ToMe's per-layer counts for ``(r, inflect)`` over ``n_stages`` merges (``tome.utils.parse_r``;
    one merge: r)."""
    if n_stages == 1:
        return [r]
    low = int(r * (1.0 - inflect))
    step = (2 * r - 2 * low) / (n_stages - 1)
    return [int(low + step * i) for i in range(n_stages)]


def spread(removals: torch.Tensor, inflect: float, n_stages: int) -> torch.Tensor:
    """``removals`` (one total per pool) spread over ``n_stages`` merges along parse_r's trend, by
    cumulative rounding (the counts add up to the totals): (n_stages, n_pools) long."""
    i = torch.arange(n_stages, dtype=torch.float64)
    weights = (1.0 - inflect) + 2.0 * inflect * i / max(n_stages - 1, 1)
    share = torch.cumsum(weights, 0) / weights.sum()
    cumulative = torch.floor(share[:, None] * removals[None, :].double() + 0.5).long()
    return torch.diff(cumulative, dim=0, prepend=torch.zeros_like(cumulative[:1]))


def bipartite_soft_matching(keys: torch.Tensor, order: torch.Tensor, pool: torch.Tensor, r: torch.Tensor,
                            release_order: bool = False):
    """ToMe's bipartite soft matching in every pool at once.

    ``order``: the visual indices to match, each pool's a contiguous run in the order that the A/B
    alternation follows; ``pool``: the pool of each (non-decreasing); ``keys``: (n_visual, d) metric
    by visual index; ``r``: (n_pools,) tokens to merge per pool (capped at the pool's A tokens).
    Within a pool the 1st, 3rd, ... entries are B and the 2nd, 4th, ... are A; each A token's edge goes
    to its most similar B token (cosine; the first on ties) and the ``r`` best edges merge (ties:
    the earlier A token first).

    Returns ``(keep, removed, into, (a, best), after)``: the kept visual indices (sorted), the merged
    A tokens and their B tokens, the A tokens and their edges' similarities, and (``release_order``;
    else None) the release's order after the merge: each pool's unmerged A tokens, then its B tokens."""
    n_pools = int(r.numel())
    counts = torch.bincount(pool, minlength=n_pools)
    is_a = (torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[pool]) % 2 == 1
    at_a, at_b = torch.nonzero(is_a, as_tuple=True)[0], torch.nonzero(~is_a, as_tuple=True)[0]
    a, b = order[at_a], order[at_b]
    metric = keys[order]
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero key: cosine 0
    similarity = metric[at_a] @ metric[at_b].T
    pool_a = pool[at_a]
    if n_pools > 1:
        similarity.masked_fill_(pool_a[:, None] != pool[at_b][None, :], float("-inf"))
    best, edge = similarity.max(dim=1)  # the first maximum on ties
    # every pool's A tokens, best edge first (ties: the earlier A token); its first r[pool] merge
    ranked = torch.sort(best, descending=True, stable=True).indices
    ranked_pool, by_pool = torch.sort(pool_a[ranked], stable=True)
    ranked = ranked[by_pool]
    a_counts = torch.bincount(pool_a, minlength=n_pools)
    within = torch.arange(ranked.numel()) - (torch.cumsum(a_counts, 0) - a_counts)[ranked_pool]
    chosen = ranked[within < r[ranked_pool]]  # positions in ``a``, best edge first
    stays = torch.ones(order.numel(), dtype=torch.bool)
    stays[at_a[chosen]] = False
    keep = torch.sort(order[stays]).values
    after = None
    if release_order:
        unmerged = stays[at_a]
        groups = torch.cat([pool_a[unmerged], pool[at_b]])  # stable: within a pool, A before B
        after = torch.cat([a[unmerged], b])[torch.sort(groups, stable=True).indices]
    return keep, a[chosen], b[edge[chosen]], (a, best), after


# ----------------------------------------------------------------------------- the strategy
class ToMe(Strategy):
    """ToMe: bipartite soft matching on the layer's keys, A tokens folded into B tokens by size."""

    name = "tome"
    Config = ToMeConfig
    position_ids = "original"  # a merged token keeps its B token's position (the contract's rule)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._counts: dict[tuple, dict[int, torch.Tensor]] = {}
        self._order: torch.Tensor | None = None  # release_order: each pool's order after the last merge
        self._match = None  # (layout, stage, result) of the stage being decided

    def layers(self, n_layers: int) -> list[int]:
        """The layers after which a merge may happen (before dropping the merges of 0 tokens)."""
        first = self.config.first_layer if self.config.first_layer is not None else scale_layer(FIRST_LAYER, n_layers)
        last = self.config.last_layer if self.config.last_layer is not None else n_layers - 2
        return list(range(first, last + 1))

    def counts(self, ctx) -> dict[int, torch.Tensor]:
        """Tokens to merge after each merge layer, per pool (views, or one): {layer: (n_pools,)};
        layers with nothing to merge are left out."""
        layout = ctx.layout
        key = (ctx.n_layers, tuple(v.size for v in layout.views))
        if key not in self._counts:
            layers, cfg = self.layers(ctx.n_layers), self.config
            sizes = [v.size for v in layout.views] if cfg.per_view else [layout.n_visual]
            if not layers:
                table = torch.zeros(0, len(sizes), dtype=torch.long)
            elif cfg.r is not None:
                table = torch.tensor(parse_r(cfg.r, cfg.inflect, len(layers)))[:, None].expand(-1, len(sizes))
            else:
                budget = Budget(keep_ratio=cfg.keep_ratio, per_view=cfg.per_view)
                kept = budget.quotas(layout) if cfg.per_view else [budget.total(layout)]
                table = spread(torch.tensor(sizes) - torch.tensor(kept), cfg.inflect, len(layers))
            self._counts[key] = {layer: row.clone() for layer, row in zip(layers, table) if int(row.sum()) > 0}
        return self._counts[key]

    def schedule(self, ctx):
        self._order, self._match = None, None
        layers = list(self.counts(ctx))
        return PrunePlan(tuple(Stage(layer, name="merge", verb="merge") for layer in layers),
                         signals=tuple(visual_keys(layer) for layer in layers),
                         proportional_attention=self.config.proportional_attention)

    def _matched(self, stage: Stage, ctx, layout):
        """The matching of this stage, computed once (score, select and assign all read it)."""
        if self._match is not None and self._match[0] is layout and self._match[1] == stage:
            return self._match[2]
        present = layout.present_visual()
        order = present
        if self.config.release_order and self._order is not None and self._order.numel() == present.numel():
            order = self._order
        pool = layout.view_of_visual()[order] if self.config.per_view else torch.zeros_like(order)
        keys = ctx.signals[visual_keys(stage.after_layer)]
        result = bipartite_soft_matching(keys, order, pool, self.counts(ctx)[stage.after_layer],
                                         self.config.release_order)
        self._order = result[4]
        self._match = (layout, stage, result)
        return result

    def score(self, stage, signals, ctx):
        """Keep priority: an A token's minus its edge similarity (the most similar merge first), +inf
        for B tokens (never merged), NaN for absent tokens."""
        layout = ctx.current_layout
        _, _, _, (a, best), _ = self._matched(stage, ctx, layout)
        scores = torch.full((layout.n_visual,), float("nan"))
        scores[layout.present_visual()] = float("inf")
        scores[a] = -best
        return scores

    def select(self, stage, scores, ctx, layout):
        return self._matched(stage, ctx, layout)[0]

    def assign(self, stage, keep, ctx, layout):
        _, removed, into, _, _ = self._matched(stage, ctx, layout)
        return Assignment(removed, into)  # weight None: each token's size (ToMe's merge_wavg)


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(ToMe)
