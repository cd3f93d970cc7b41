"""``vla-cache``: VLA-Cache (Xu et al., NeurIPS 2025, arXiv 2502.02175,
https://arxiv.org/abs/2502.02175): reuse, from the previous query, the keys and values of the
visual tokens whose patches did not change and that the task does not attend to.

Per query, from the second of an episode on (the first runs dense and fills the cache):

1. **Static patches.** The cosine similarity of every patch's raw pixels (on the model's own patch
   grid after its preprocessing, ``QueryContext.patch_pixels``) between the current frame and the
   frame of the *previous query* (whose keys and values are cached); per view, the at most
   ``static_share`` x view most similar patches with similarity >= 0.996 are static
   (release: ``find_static_patches(..., top_k=150, sim_threshold=0.996)``, 150 of 256).
2. **Minus the task-relevant ones.** Per view, the ``relevant_share`` x view patches (100 of 256)
   with the most text -> vision attention in the *previous query* at layer 15 of 32 (head mean,
   row mean) are never reused (``task_relevant_selection`` / ``token_attention_merge``). The
   release's rows are the 34 positions 513..546 after OpenVLA-OFT's 512 patches: the proprio token,
   the prompt, then as many action slots as are left; ``relevance_rows="release"`` takes the same
   first 34 tokens after the images (``attention(l, "post_visual", per_row=True)``), any row group
   name its rows instead. What remains, in ascending visual index (view 0, then view 1, each in
   raster order, as the release concatenates ``remaining`` lists), is the *reusable* list.
3. **Layer-adaptive proportion** (``get_layer_mask_schedule``): e_l = mean over rows of the entropy
   of the head-mean attention over all keys at layer l in the previous query
   (``attention_entropy(l, "all")``, every layer); reuse_l = 1 - (e_l - min e) / (max e - min e);
   an upward step from the layer before is damped, reuse_l = reuse_(l-1) + 0.55 (reuse_l -
   reuse_(l-1)), layer after layer on the damped values.
4. **Reuse.** At the reuse layers {2, 6, 9, 11} of 32 (the patched Llama's ``pruning_loc``), the
   first max(1, floor(reuse_l x n)) of the n reusable tokens stop being computed from layer l on
   (a ``reuse`` stage after layer l - 1); the count never shrinks (a layer whose count is not
   larger than the one before changes nothing, as in the release). Their keys and values at every
   later layer come from the cache at their original positions (the engine's per-episode
   ``KVCache``: the latest query that computed them there, as the release's ``DynamicCache``
   overwritten at ``cache_position``).

Defaults are the release's (github.com/siyuhsu/vla-cache@a490988,
``src/openvla-oft/experiments/robot/vla_cache_utils.py``, ``openvla_utils.py`` ``get_vla_action``,
``libero/run_libero_eval.py``; the patched Llama, which the repository does not hold, as vendored in
MINT-SJTU/VLA-Pruner@3d156ee ``src/openvla-oft/transformers/src/transformers/models/llama/
modeling_llama.py``, ``LlamaModel.pruning_loc = [2, 6, 9, 11]`` and its forward). Layers are given
for the 32-layer decoder and mapped with ``prunebench.scale_layer`` (the built-in 4-layer model:
reuse from layers {0, 1}, relevance at layer 2); counts given for 256-patch views are shares of a
view, rounded half up (the built-in 64-patch views: 38 static, 25 relevant).

Differences from the release (see docs/strategies.md):

* **The previous frame is the previous query's.** The release's OFT LIBERO eval stores the current
  frame before it takes "the previous image" (``replay_images.append(img)`` then
  ``prev_img = replay_images[-1]``), so it compares each frame with itself: every patch is static
  (similarity 1) except all-black ones (0), and the ties decide which 150 are. Ours compares with the
  frame the cached keys and values came from, as VLA-Pruner's OFT eval does;
  ``release_same_frame_bug=true`` reproduces the release.
* **No reusable token, no reuse.** The release passes ``None`` to the model then (and fails);
  ours runs the query without reuse stages.
* **Signals** are computed in float32 from the q and k each layer computes under SDPA, only the rows
  asked for; the release runs eager attention on every layer and returns every attention map.
  The entropy at every layer needs the softmax of all rows at every layer, which is the method's
  cost and is charged to ``overhead``; ``layer_adaptive=false`` (reuse every reusable token from
  the first reuse layer) needs none of it.
* **Ablations** not in the release: ``reuse_order="similarity"`` (the most similar reusable tokens
  first instead of view 0's top rows first), ``damp_growth=false``, ``relevance_rows``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import prunebench
from prunebench import (
    PrunePlan,
    Stage,
    Strategy,
    StrategyConfig,
    TokenLayout,
    attention,
    attention_entropy,
    scale_layer,
)
from prunebench.contract.layout import ROW_GROUPS
from prunebench.selection import rank_in_view, top_k_per_view

PAPER_REUSE_LAYERS = (2, 6, 9, 11)  # the patched Llama's pruning_loc
PAPER_RELEVANCE_LAYER = 15  # token_attention_merge(layer_id=15)
RowChoice = Literal[("release", *ROW_GROUPS)]  # the release's rows, or any row group


class VLACacheConfig(StrategyConfig):
    similarity_threshold: float = Field(0.996, gt=0, le=1, description="patch cosine >= this: static")
    static_share: float = Field(150 / 256, ge=0, le=1,
                                description="at most this share of a view is static (the most similar)")
    relevant_share: float = Field(100 / 256, gt=0, le=1,
                                  description="share of a view the previous attention marks task-relevant")
    relevance_layer: int | None = Field(None, ge=0, description="None = 15 of 32, scaled")
    relevance_rows: RowChoice = Field("release", description="release = the first release_rows tokens "
                                                             "after the images; or a row group")
    release_rows: int = Field(34, ge=1, description="rows 513..546 on OpenVLA-OFT")
    reuse_layers: tuple[int, ...] | None = Field(
        None, description="layers from which reused tokens are not computed; None = {2,6,9,11} of 32, scaled")
    layer_adaptive: bool = Field(True, description="per-layer proportion from the attention entropy")
    damp_growth: bool = Field(True, description="damp upward steps of the proportion (apply_weighted_growth)")
    growth_factor: float = Field(0.55, ge=0, le=1)
    reuse_order: Literal["position", "similarity"] = Field(
        "position", description="which reusable tokens go first: release order, or the most similar")
    release_same_frame_bug: bool = Field(False, description="compare each frame with itself (the release)")

    @classmethod
    def search_space(cls, trial):
        return cls(similarity_threshold=trial.suggest_float("similarity_threshold", 0.95, 0.9999),
                   static_share=trial.suggest_float("static_share", 0.1, 0.95),
                   relevant_share=trial.suggest_float("relevant_share", 0.05, 0.8),
                   growth_factor=trial.suggest_float("growth_factor", 0.0, 1.0))


# ----------------------------------------------------------------------------- the pieces
def share_count(share: float, size: int) -> int:
    """A count given as a share of a view, rounded half up (150/256 of 256 = 150; of 64 = 38)."""
    return int(share * size + 0.5)


def patch_similarity(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each patch's raw pixels, (n_visual,): dot / (|a| |b| + 1e-8) in float32,
    as the release's ``calculate_patch_similarity`` (an all-zero patch gets 0)."""
    a, b = current.float(), previous.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)


def static_patches(similarity: torch.Tensor, threshold: float, counts: list[int],
                   layout: TokenLayout) -> torch.Tensor:
    """Per view, the at most ``counts[v]`` most similar patches with similarity >= ``threshold``
    (ties: lower index first, as the release's stable sort); sorted visual indices."""
    most = torch.tensor(counts)[layout.view_of_visual()]
    static = (similarity >= threshold) & (rank_in_view(similarity, layout) < most)
    return torch.nonzero(static, as_tuple=True)[0]


def reusable_tokens(static: torch.Tensor, relevance: torch.Tensor, counts: list[int],
                    layout: TokenLayout) -> torch.Tensor:
    """The static patches that are not among each view's top ``counts[v]`` by ``relevance`` (sorted)."""
    relevant = top_k_per_view(relevance, counts, layout)
    return static[~torch.isin(static, relevant)]


def reuse_proportions(entropies: torch.Tensor, damp: bool = True, growth: float = 0.55) -> torch.Tensor:
    """Per layer, 1 - min-max-normalised entropy, upward steps damped by ``growth`` (float32),
    as the release's ``get_layer_mask_schedule``."""
    e = entropies.float()
    reuse = 1.0 - (e - e.min()) / (e.max() - e.min() + 1e-10)
    if not damp:
        return reuse
    values = reuse.tolist()  # one value per layer: the recurrence runs on the damped values
    for i in range(1, len(values)):
        if values[i] > values[i - 1]:
            values[i] = values[i - 1] + (values[i] - values[i - 1]) * growth
    return torch.tensor(values, dtype=torch.float32)


def reuse_counts(proportions: torch.Tensor, n_reusable: int) -> torch.Tensor:
    """Tokens reused from each reuse layer on: max(1, floor(p x n)), never fewer than at the layer
    before (the release skips a layer whose count would shrink)."""
    counts = (proportions.float() * n_reusable).long().clamp(min=1, max=n_reusable)
    return counts.cummax(0).values


# ----------------------------------------------------------------------------- the strategy
class VLACache(Strategy):
    """VLA-Cache: reuse the previous query's keys and values of static, task-irrelevant patches."""

    name = "vla-cache"
    Config = VLACacheConfig
    reuses_kv = True
    position_ids = "original"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.on_episode_start(None)

    def on_episode_start(self, episode) -> None:
        self.previous_pixels: torch.Tensor | None = None  # the previous query's frame, patch pixels
        self.relevance: torch.Tensor | None = None  # its text -> vision attention at the relevance layer
        self.proportions: torch.Tensor | None = None  # its per-layer reuse proportions
        self.similarity: torch.Tensor | None = None
        self.reusable = torch.zeros(0, dtype=torch.long)
        self.reused: dict[int, torch.Tensor] = {}  # stage point -> visual indices reused from there on

    def layers(self, n_layers: int) -> tuple[tuple[int, ...], int]:
        """(reuse layers inside the model, sorted, merged; relevance layer)."""
        c = self.config
        reuse = c.reuse_layers if c.reuse_layers is not None else tuple(
            scale_layer(l, n_layers) for l in PAPER_REUSE_LAYERS)
        relevance = c.relevance_layer if c.relevance_layer is not None else scale_layer(
            PAPER_RELEVANCE_LAYER, n_layers)
        return tuple(sorted({l for l in reuse if 0 <= l < n_layers})), min(relevance, n_layers - 1)

    def signals(self, n_layers: int):
        c = self.config
        _, layer = self.layers(n_layers)
        if c.relevance_rows == "release":
            wanted = [attention(layer, "post_visual", per_row=True)]
        else:
            wanted = [attention(layer, c.relevance_rows)]
        if c.layer_adaptive:
            wanted += [attention_entropy(l, "all") for l in range(n_layers)]
        return tuple(wanted)

    def schedule(self, ctx):
        if ctx.query_index == 0:  # the engine empties the cache there: nothing to reuse
            self.on_episode_start(None)
        c = self.config
        signals = self.signals(ctx.n_layers)
        current = ctx.patch_pixels(ctx.observation.images)
        previous = current if c.release_same_frame_bug else self.previous_pixels
        self.previous_pixels = current
        self.reused, self.similarity = {}, None
        self.reusable = torch.zeros(0, dtype=torch.long)
        ready = self.relevance is not None and (self.proportions is not None or not c.layer_adaptive)
        if previous is None or not ready:  # the first query of an episode: dense, fills the cache
            return PrunePlan.dense(signals)
        layout = ctx.layout
        sizes = [v.size for v in layout.views]
        self.similarity = patch_similarity(current, previous)
        static = static_patches(self.similarity, c.similarity_threshold,
                                [share_count(c.static_share, s) for s in sizes], layout)
        reusable = reusable_tokens(static, self.relevance,
                                   [max(1, share_count(c.relevant_share, s)) for s in sizes], layout)
        if c.reuse_order == "similarity":  # most similar first, ties by position
            reusable = reusable[torch.sort(self.similarity[reusable], descending=True, stable=True).indices]
        self.reusable = reusable
        reuse_layers, _ = self.layers(ctx.n_layers)
        if not reusable.numel() or not reuse_layers:
            return PrunePlan.dense(signals)
        at = torch.tensor(reuse_layers)
        proportions = self.proportions[at] if c.layer_adaptive else torch.ones(len(reuse_layers))
        counts = reuse_counts(proportions, int(reusable.numel())).tolist()
        stages, before = [], 0
        for layer, count in zip(reuse_layers, counts):
            if count > before:  # a layer that would reuse no more than the one before changes nothing
                self.reused[layer - 1] = torch.sort(reusable[:count]).values
                stages.append(Stage(layer - 1, name=f"reuse@{layer}", verb="reuse"))
                before = count
        return PrunePlan(tuple(stages), signals)

    def score(self, stage, signals, ctx):
        """The patch similarity to the previous frame (``select`` decides from the schedule's list)."""
        return self.similarity.clone()

    def select(self, stage, scores, ctx, layout):
        """Every present visual token keeps computing but this stage's reused ones."""
        present = layout.present_visual()
        return present[~torch.isin(present, self.reused[stage.after_layer])]

    def on_forward_end(self, signals, record) -> None:
        c = self.config
        n_layers = len(record.tokens_per_layer)
        _, layer = self.layers(n_layers)
        if c.relevance_rows == "release":
            rows = signals[attention(layer, "post_visual", per_row=True)]
            relevance = rows[:c.release_rows].mean(0)
        else:
            relevance = signals[attention(layer, c.relevance_rows)]
        self.relevance = torch.nan_to_num(relevance, nan=0.0)
        if c.layer_adaptive:
            entropies = torch.cat([signals[attention_entropy(l, "all")] for l in range(n_layers)])
            self.proportions = reuse_proportions(entropies, c.damp_growth, c.growth_factor)


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(VLACache)
