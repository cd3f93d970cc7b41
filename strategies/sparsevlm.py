"""``sparsevlm``: SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417, https://arxiv.org/abs/2410.04417).

Text-guided, training-free visual token sparsification inside the LLM, after the v1 release
(``Gumpest/SparseVLMs@b72c5d6``, method files as in ``91fb6d9``):

1. **Raters**, once per query on the LLM input embeddings: each visual token spreads a softmax over
   the prompt tokens (raw dot products); prompt tokens whose mean share is above the mean rate.
2. **Scores** at a pruning layer: the raters' attention to each visual token, averaged.
3. **Progressive, rank-adaptive pruning** after layers 2, 6, 15, 19 of 32 (scaled): ``keep_ratio``
   is the share left after the last stage; earlier stages follow a geometric schedule to it, each
   scaled by rank(rater attention) / its full rank, never below the final count.
4. **Recycling** (``recycle``, on as in v1): of each stage's deleted tokens the top 30 % + 1 form
   one density-peak cluster per 10 (+1) on the layer's visual keys; one member per cluster is kept
   and the others merged into it (the ``merge`` verb), so it holds the cluster mean; the rest are
   dropped. Cluster tokens count inside each stage's count.

``variant="vla-pruner"``: VLA-Pruner's single-stage simplification (``MINT-SJTU/VLA-Pruner@fa5bfed``).
What we read in the releases, the defaults and every difference: docs/strategies.md, "SparseVLM".
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

import prunebench
from prunebench import (
    EMBEDDINGS,
    Assignment,
    Budget,
    PrunePlan,
    Stage,
    Strategy,
    StrategyConfig,
    attention,
    row_embeddings,
    scale_layer,
    visual_keys,
)
from prunebench.selection import present_in_view, top_k, top_k_under_budget

ORIGINAL_LAYERS = (2, 6, 15, 19)  # v1 release, LlamaDynamicvitModel(pruning_loc=...)
VLA_PRUNER_LAYERS = (2,)  # VLA-Pruner: fastv_k = 3, attention of layer K - 1
RECYCLE_TENTHS = 3  # the release recycles the top 30 % (+1) of the deleted tokens ...
TOKENS_PER_CLUSTER = 10  # ... in one cluster per 10 of them (+1)


class SparseVLMConfig(StrategyConfig):
    variant: Literal["original", "vla-pruner"] = Field(
        "original", description="original: progressive, rank-adaptive; vla-pruner: one stage (VLA-Pruner's)")
    keep_ratio: float = Field(110 / 576, gt=0, le=1,
                              description="share of visual tokens left after the last stage (110/576)")
    layers: tuple[int, ...] | None = Field(
        None, description="prune after these layers; None = 2, 6, 15, 19 of 32 (vla-pruner: 2), scaled")
    rank_adaptive: bool = Field(True, description="counts follow rank(rater attention); False = fixed schedule")
    rater_rows: Literal["prompt", "text"] = Field("prompt", description="rater candidates (text: no template)")
    per_view: bool = Field(False, description="split each stage's count by view; False = one pool")
    release_positions: bool = Field(False, description="renumber positions after each stage (the release)")
    recycle: bool = Field(True, description="merge the best deleted tokens into cluster tokens (v1); vla-pruner: never")

    @model_validator(mode="before")
    @classmethod
    def _vla_pruner_does_not_recycle(cls, data):
        if isinstance(data, dict) and data.get("variant") == "vla-pruner" and "recycle" not in data:
            return {**data, "recycle": False}
        return data

    @model_validator(mode="after")
    def _layers_fit_variant(self) -> "SparseVLMConfig":
        if self.variant == "vla-pruner" and self.recycle:
            raise ValueError("recycle: the vla-pruner variant never recycles (its release does not)")
        if self.variant == "vla-pruner" and self.release_positions:
            raise ValueError("release_positions: the vla-pruner variant keeps the original positions")
        if self.layers is not None:
            if not self.layers or min(self.layers) < 0:
                raise ValueError("layers: give one or more layer indices >= 0")
            if self.variant == "vla-pruner" and len(set(self.layers)) != 1:
                raise ValueError("layers: the vla-pruner variant prunes after one layer")
        return self

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.05, 1.0),
                   per_view=trial.suggest_categorical("per_view", [False, True]),
                   rater_rows=trial.suggest_categorical("rater_rows", ["prompt", "text"]))


# ----------------------------------------------------------------------------- the pieces
def text_relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Relevance of each text token to the image: softmax over the text tokens of every visual
    token's raw dot products with them, averaged over the visual tokens. (n_text,), float32."""
    logits = visual.float() @ text.float().T  # (n_visual, n_text)
    return torch.softmax(logits, dim=1).mean(dim=0)


def raters_from_relevance(relevance: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
    """Indices of the text tokens above the mean relevance (``inclusive``: at or above it, as
    VLA-Pruner); every token when none is strictly above (all equal)."""
    mean = relevance.mean()
    chosen = relevance >= mean if inclusive else relevance > mean
    if not bool(chosen.any()):
        chosen = relevance >= mean
    return torch.nonzero(chosen, as_tuple=True)[0]


def rater_scores(rows: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Per visual token, the mean attention of the rater rows (NaN stays NaN): (n_visual,)."""
    return rows[raters].mean(dim=0)


def rater_rank(rows: torch.Tensor, raters: torch.Tensor, present: torch.Tensor) -> int:
    """Rank of P, the raters' attention to the present visual tokens (torch's default tolerance)."""
    return int(torch.linalg.matrix_rank(rows[raters][:, present].float()))


def schedule_counts(n_visual: int, keep_ratio: float, n_stages: int) -> list[int]:
    """Visual tokens kept after each stage: geometric from n_visual to the final
    k = max(1, round(keep_ratio x n_visual)), which the last stage keeps."""
    final = max(1, round(keep_ratio * n_visual))
    counts = [max(final, int(n_visual * (final / n_visual) ** ((i + 1) / n_stages) + 0.5))
              for i in range(n_stages - 1)]
    return counts + [final]


def rank_adapted_count(target: int, rank: int, full_rank: int, final: int, present: int) -> int:
    """A stage's kept count: ``target`` scaled by rank(P) / its full rank, in [final, present]."""
    count = int(target * rank / max(full_rank, 1) + 0.5)
    return max(1, min(present, max(final, count)))


# ----------------------------------------------------------------------------- recycling
def recycle_counts(deleted: int) -> tuple[int, int]:
    """Of ``deleted`` tokens, how many the release recycles (the top 30 %, +1) and into how many
    clusters (one per 10 recycled, +1); (0, 0) when nothing is deleted."""
    if deleted <= 0:
        return 0, 0
    recycled = RECYCLE_TENTHS * deleted // 10 + 1  # int(deleted x 0.3) + 1, in integers
    return recycled, recycled // TOKENS_PER_CLUSTER + 1


def recycle_split(present: int, total: int) -> tuple[int, int, int]:
    """How a stage that leaves ``total`` of ``present`` visual tokens splits them when it recycles:
    (kept by score, recycled, clusters), the cluster tokens counted *inside* ``total``: ``scored +
    clusters == total``, the deleted tokens being ``present - scored``. The least fixed point of
    clusters = recycle_counts(present - total + clusters)[1] (a few integer steps: the count grows by
    about 3 % of the deleted tokens). Nothing recycles when nothing is deleted, or when the clusters
    would leave no token kept by score (a tiny ``total``): then the stage just keeps ``total``."""
    total = min(total, present)
    if total >= present:
        return total, 0, 0
    clusters = 0
    while True:
        recycled, needed = recycle_counts(present - total + clusters)
        if needed == clusters:
            break
        clusters = needed
    if total - clusters < 1:
        return total, 0, 0
    return total - clusters, recycled, clusters


def knn_density(dist: torch.Tensor, k: int) -> torch.Tensor:
    """DPC-kNN local density: exp(-mean squared distance to the ``k`` nearest points, the point
    itself (distance 0) included). (m,)."""
    nearest = torch.topk(dist, min(k, dist.shape[1]), dim=1, largest=False).values
    return torch.exp(-(nearest ** 2).mean(dim=1))


def dpc_knn_clusters(features: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with kNN density (the release's ``cluster_and_merge``), all tensor ops.

    ``features`` (m, d), rows in priority order (best score first). Distances are Euclidean / sqrt(d);
    density from the ``n_clusters`` nearest points (the release uses the cluster count as k); a
    point's *separation* is its distance to the nearest denser point (the largest distance of all for
    the densest); the ``n_clusters`` points with the largest density x separation are the centres,
    and every point joins its nearest centre (a centre its own). Ties (equal densities, equal
    products, equidistant centres) go to the earlier row, where the release adds noise of 1e-6 to the
    densities. Returns (labels (m,) in 0 .. n_clusters-1, centres (n_clusters,) row indices)."""
    x = features.float()
    m = x.shape[0]
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / x.shape[1] ** 0.5  # exact, symmetric
    density = knn_density(dist, n_clusters)
    row = torch.arange(m)
    # denser[i, j]: j is denser than i (an equal density counts as denser when j comes first)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (row[None, :] < row[:, None]))
    separation = torch.where(denser, dist, dist.max()).min(dim=1).values
    centres = torch.sort(separation * density, descending=True, stable=True).indices[:n_clusters]
    labels = dist[:, centres].argmin(dim=1)
    labels[centres] = torch.arange(centres.numel())
    return labels, centres


def recycle(scores: torch.Tensor, among: torch.Tensor, split: tuple[int, int, int], features: torch.Tensor,
            sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pool's recycling: (keep, removed, into) visual indices.

    ``split`` = (scored, recycled, clusters) from ``recycle_split``. The ``scored`` best of ``among``
    are kept; the next ``recycled`` by score (the best of the deleted) are clustered on their
    ``features`` rows; each cluster's *representative* is kept and its other members fold into it
    (``removed[i]`` -> ``into[i]``); the rest of ``among`` is dropped. The representative is the
    member holding the fewest original tokens (``sizes``), then the best-scored; every member is
    folded at the representative's own weight (its size), so the merged hidden state is the plain
    mean of the members, as the release's cluster token, whatever they already hold."""
    scored, n_recycled, n_clusters = split
    ranked = top_k(scores, among.numel(), among, ordered=True)  # best first, ties by lower index
    kept = ranked[:scored]
    if n_clusters == 0:
        empty = among[:0]
        return torch.sort(kept).values, empty, empty
    pool = ranked[scored:scored + n_recycled]
    labels, _ = dpc_knn_clusters(features[pool], n_clusters)
    m = pool.numel()
    priority = sizes[pool].round().long() * m + torch.arange(m)  # fewest tokens, then best score
    first = torch.full((n_clusters,), priority.max() + 1).scatter_reduce(0, labels, priority, "amin")
    rep = first % m  # the representative's row in the pool, per cluster
    member = torch.ones(m, dtype=torch.bool)
    member[rep] = False
    keep = torch.sort(torch.cat([kept, pool[rep]])).values
    return keep, pool[member], pool[rep][labels[member]]


class SparseVLM(Strategy):
    """SparseVLM: text raters score the visual tokens; progressive, rank-adaptive pruning; the best deleted
    tokens recycled into cluster tokens."""

    name = "sparsevlm"
    Config = SparseVLMConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        # the LLaVA release renumbers: a flag, as that breaks a policy trained with fixed positions
        self.position_ids = "recompact" if self.config.release_positions else "original"
        self.raters: torch.Tensor | None = None
        self.ranks: dict[int, int] = {}  # after_layer -> rank(P) at that stage (this query)
        self.counts: dict[int, int] = {}  # after_layer -> visual tokens kept there (this query)
        # after_layer -> (kept by score, recycled, clusters) per pool (one, or one per view)
        self.recycling: dict[int, list[tuple[int, int, int]]] = {}
        self.assignments: dict[int, Assignment] = {}  # after_layer -> what its merge folds
        self.sizes: torch.Tensor | None = None  # original tokens each visual token holds (this query)

    def layers(self, n_layers: int) -> tuple[int, ...]:
        c = self.config
        paper = ORIGINAL_LAYERS if c.variant == "original" else VLA_PRUNER_LAYERS
        layers = c.layers if c.layers is not None else tuple(scale_layer(l, n_layers) for l in paper)
        return tuple(sorted({min(l, n_layers - 2) for l in layers}))

    def schedule(self, ctx):
        c = self.config
        self.raters, self.ranks, self.counts = None, {}, {}
        self.recycling, self.assignments = {}, {}
        self.sizes = torch.ones(ctx.layout.n_visual)
        if ctx.n_layers < 2:  # no layer has another after it
            return PrunePlan.dense()
        layers = self.layers(ctx.n_layers)
        self.stage_index = {l: i for i, l in enumerate(layers)}
        self.targets = schedule_counts(ctx.layout.n_visual, c.keep_ratio, len(layers))
        budget = Budget(keep_ratio=c.keep_ratio, per_view=c.per_view) if c.variant == "vla-pruner" else None
        verb = "merge" if c.recycle else "drop"
        stages = tuple(Stage(l, budget, name=c.variant, verb=verb) for l in layers)
        signals = (EMBEDDINGS, row_embeddings(c.rater_rows),
                   *(attention(l, c.rater_rows, per_row=True) for l in layers),
                   *(visual_keys(l) for l in layers if c.recycle))  # what recycling clusters on
        return PrunePlan(stages, signals)

    def _raters(self, signals) -> torch.Tensor:
        if self.raters is None:
            relevance = text_relevance(signals[EMBEDDINGS], signals[row_embeddings(self.config.rater_rows)])
            self.raters = raters_from_relevance(relevance, inclusive=self.config.variant == "vla-pruner")
        return self.raters

    def score(self, stage, signals, ctx):
        rows = signals[attention(stage.after_layer, self.config.rater_rows, per_row=True)]
        raters = self._raters(signals)
        if self.config.variant == "original":
            self._count(stage, rows, raters, ctx.current_layout)
        return rater_scores(rows, raters)

    def _count(self, stage, rows, raters, layout) -> None:
        """This stage's kept count from the schedule and, unless it is the last, rank(P)."""
        i = self.stage_index[stage.after_layer]
        present = layout.present_visual()
        target, final = self.targets[i], self.targets[-1]
        count = min(target, present.numel())
        if self.config.rank_adaptive:
            rank = rater_rank(rows, raters, present)
            self.ranks[stage.after_layer] = rank
            if i < len(self.targets) - 1:
                full = min(raters.numel(), present.numel())
                count = rank_adapted_count(target, rank, full, final, present.numel())
        self.counts[stage.after_layer] = count

    def select(self, stage, scores, ctx, layout):
        if stage.budget is not None:  # vla-pruner: a fixed keep ratio
            return top_k_under_budget(scores, stage.budget, layout)
        budget = Budget(keep_count=self.counts[stage.after_layer], per_view=self.config.per_view)
        if stage.verb != "merge":
            return top_k_under_budget(scores, budget, layout)
        return self._recycle(stage, scores, ctx, layout, budget)

    def _recycle(self, stage, scores, ctx, layout, budget) -> torch.Tensor:
        """The kept tokens of a recycling stage (by score, then one representative per cluster);
        what ``assign`` folds is kept for it. Per view, each view recycles within its own quota."""
        if budget.per_view:
            pools = [(present_in_view(layout, v), q) for v, q in enumerate(budget.quotas(layout))]
        else:
            pools = [(layout.present_visual(), budget.total(layout))]
        features = ctx.signals[visual_keys(stage.after_layer)]
        splits = [recycle_split(among.numel(), total) for among, total in pools]
        keeps, removed, into = zip(*(recycle(scores, among, split, features, self.sizes)
                                     for (among, _), split in zip(pools, splits)))
        removed, into = torch.cat(removed), torch.cat(into)
        self.recycling[stage.after_layer] = splits
        # each member weighs what its representative weighs (the engine weighs a kept token by its
        # size): a cluster token is the plain mean of its members, as in the release
        self.assignments[stage.after_layer] = Assignment(removed, into, self.sizes[into].clone())
        return torch.sort(torch.cat(keeps)).values

    def assign(self, stage, keep, ctx, layout):
        assignment = self.assignments[stage.after_layer]
        self.sizes.index_add_(0, assignment.into, self.sizes[assignment.removed])
        return assignment


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(SparseVLM)
