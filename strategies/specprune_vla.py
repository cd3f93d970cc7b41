"""``specprune-vla``: SpecPrune-VLA (Wang et al., arXiv 2509.05614), three parts, each switchable.

1. **Static (action-level) pruning** after the first two layers. A visual patch that barely changed
   since the frame T-1 env steps back (cosine >= 0.986 of its raw pixels on the model's own patch
   grid, ``QueryContext.patch_pixels``; at most a share ``static_max_removed`` of the view) is
   *static*; every other patch is *dynamic* and always kept. With no earlier frame (an episode's
   first query) every patch is dynamic and the static stages are not scheduled. A static patch
   survives only if text->vision attention ranks it in the view's top-3k after layer 0 (then top-k
   after layer 1, plus the first k of the layer-0 list), or if the previous query's *global*
   attention ranks it in the view's top-k.
2. **Dynamic (layer-level) pruning** at layers S (paper: {5, 10, 15, 20} of 32): an importance
   score is an EMA (alpha 0.2) over layers {0, 1, 12} of rank weights (10 -> 0.1) by attention from
   the non-visual rows after the images; each S layer keeps the top ``0.8 x`` of the whole sequence
   (non-visual tokens always kept), down to a floor of 60 visual tokens per 512.
3. **Action-aware controller**: each executed action is coarse or fine by its speed; fine ("precise")
   mode keeps more tokens, and switching coarse -> fine mid-chunk re-queries the model at once. The
   frame lookback T shrinks as the last chunk's summed motion grows.

Differences from the release (github.com/alexwhz-sjtu/SpecPrune-VLA@d3b06ed), see docs/strategies.md:
both index bugs fixed (``release_layer1_index_bug`` / ``release_ema_index_bug`` reproduce them);
the paper's global term (attention from the previous generation) is empty in the release
(``get_vla_action`` in openvla-oft/experiments/robot/openvla_utils.py returns an empty
``prev_attn_indices``); ours is the previous query's text->vision attention averaged over
``global_layers`` (pruned tokens count 0), top-k per view; the lookback is clamped to T >= 2 (the
release's formula in openvla-oft/experiments/robot/libero/run_libero_eval.py has no lower bound); with no
earlier frame the release compares the frame with itself (every patch static, ties broken
arbitrarily), ours keeps every patch; with fewer earlier frames than T-1 the release does the same,
ours compares with the oldest one there is; dynamic pruning is on (paper) although the release
defaults it off; counts given for 256-patch views are shares of the view; the release's eval quirks
(first actions dropped, raised max steps) live in the eval config (``skip_first_actions``,
``max_steps``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

import prunebench
from prunebench import PrunePlan, Stage, Strategy, StrategyConfig, attention, scale_layer
from prunebench.selection import rank_in_view, top_k, top_k_per_view, top_ks_per_view, union

STATIC0, STATIC1, DYNAMIC = "static0", "static1", "dynamic"


class SpecPruneConfig(StrategyConfig):
    static: bool = Field(True, description="part 1: frame-difference + text-attention static pruning")
    use_global: bool = Field(True, description="previous query's global attention term (part 1)")
    dynamic: bool = Field(True, description="part 2: layer-level dynamic pruning")
    controller: bool = Field(True, description="part 3: action-aware coarse/precise controller")

    similarity_threshold: float = Field(0.986, gt=0, le=1, description="patch cosine >= this: static")
    static_max_removed: float = Field(200 / 256, ge=0, le=1, description="max share of a view static (coarse)")
    static_max_removed_precise: float = Field(220 / 256, ge=0, le=1, description="same, precise mode")
    attn_keep: tuple[float, ...] = Field((16 / 256, 12 / 256), description="top-k share per view (coarse)")
    attn_keep_precise: tuple[float, ...] = Field((25 / 256, 19 / 256), description="same, precise mode")
    layer0_factor: int = Field(3, ge=1, description="layer 0 keeps factor x k per view")
    global_layers: tuple[int, ...] | None = Field(None, description="layers of the global term; None = all")

    dynamic_layers: tuple[int, ...] | None = Field(None, description="None = {5,10,15,20} of 32, scaled")
    importance_layers: tuple[int, ...] | None = Field(None, description="None = {0, 1, 12 of 32 scaled}")
    dynamic_keep_ratio: float = Field(0.8, gt=0, le=1, description="share of the sequence kept per S layer")
    dynamic_min_visual: float = Field(60 / 512, ge=0, le=1, description="floor, share of visual tokens")
    ema_alpha: float = Field(0.2, gt=0, le=1)

    lookback_max: int = Field(6, ge=2, le=6, description="T: compare with the frame T-1 steps back")
    lookback_min: int = Field(2, ge=2, le=6, description="clamp (the release has none)")
    controller_start: int = Field(10, ge=1, description="actions before the controller acts")
    speed_threshold: float = Field(0.4, ge=0, description="|a_xyz| below: precise")
    xy_threshold: float = Field(0.1, ge=0)
    z_threshold: float = Field(0.1, ge=0)
    rot_threshold: float = Field(0.2, ge=0)
    exit_z: float = Field(0.2, ge=0, description="leave precise mode when a_z exceeds this")
    exit_rot: float = Field(0.3, ge=0, description="... or |a_rot| exceeds this at a chunk's end")

    release_layer1_index_bug: bool = Field(False, description="reproduce the release's layer-1 index bug")
    release_ema_index_bug: bool = Field(False, description="reproduce the release's EMA index bug")

    @classmethod
    def search_space(cls, trial):
        return cls(
            similarity_threshold=trial.suggest_float("similarity_threshold", 0.95, 0.999),
            static_max_removed=trial.suggest_float("static_max_removed", 0.3, 0.95),
            attn_keep=(trial.suggest_float("attn_keep_primary", 0.02, 0.3),
                       trial.suggest_float("attn_keep_wrist", 0.02, 0.3)),
            dynamic_keep_ratio=trial.suggest_float("dynamic_keep_ratio", 0.5, 1.0),
            speed_threshold=trial.suggest_float("speed_threshold", 0.1, 1.0),
            lookback_max=trial.suggest_int("lookback_max", 2, 6))


@functools.lru_cache(maxsize=256)
def _rank_weights(n: int, layer: int) -> torch.Tensor:
    """The EMA's rank weights of ``n`` ranked tokens at ``layer``: lam x linspace(10 -> 0.1), lam =
    sigmoid(10 (32 - layer)) (constant per layer and count: built once; do not modify)."""
    with torch.inference_mode(False):  # a normal tensor, whichever mode first asks for it
        lam = float(torch.sigmoid(torch.tensor(10.0 * (32 - layer))))
        return lam * torch.linspace(10, 0.1, n)


def lookback(move: float, t_max: int = 6, t_min: int = 2) -> int:
    """The release's adaptive lookback: faster motion over the last chunk -> a more recent frame."""
    return max(t_min, min(int(-(16 / 3) * move / 6 + 22 / 3) + 3, t_max))


class SpecPruneVLA(Strategy):
    """SpecPrune-VLA: static (frame diff + text attention), dynamic (layer EMA), action-aware controller."""

    name = "specprune-vla"
    Config = SpecPruneConfig
    history_frames = 5  # T <= 6: the frame T-1 <= 5 steps back

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.on_episode_start(None)

    # ---------------------------------------------------------------- episode state
    def on_episode_start(self, episode) -> None:
        self.precise = False
        self.acting = 0
        self.motion = np.zeros(7)  # summed executed actions since the last query
        self.global_scores: torch.Tensor | None = None

    def on_env_step(self, step) -> bool:
        c = self.config
        self.acting += 1
        if self.acting < c.controller_start:
            return False
        self.motion += step.action
        if not c.controller or self.acting == c.controller_start:
            return False
        return self.update_mode(step.action, step.actions_left_in_chunk)

    def update_mode(self, action: np.ndarray, left_in_chunk: int) -> bool:
        """Coarse/precise switch after one action; True = re-query now (switched to precise mid-chunk)."""
        c = self.config
        speed, speed_xy = np.linalg.norm(action[:3]), np.linalg.norm(action[:2])
        v_z, v_rot = action[2], np.linalg.norm(action[3:6])
        if self.precise:
            self.precise = not (v_z > c.exit_z or (v_rot > c.exit_rot and left_in_chunk == 0))
            return False
        self.precise = bool(speed < c.speed_threshold or
                            (speed_xy < c.xy_threshold and v_z < c.z_threshold and v_rot < c.rot_threshold))
        return self.precise and left_in_chunk > 0

    # ---------------------------------------------------------------- the plan
    def _layers(self, n_layers: int):
        c = self.config
        static = (0, 1)
        dyn = c.dynamic_layers or tuple(scale_layer(l, n_layers) for l in (5, 10, 15, 20))
        # after the static stages (a scaled layer that lands on them moves one later), inside the
        # decoder, one stage per layer
        first = static[1] + 1 if c.static else 0
        dyn = tuple(sorted({max(l, first) for l in dyn} & set(range(n_layers - 1))))
        imp = c.importance_layers or (0, 1, scale_layer(12, n_layers))
        glob = c.global_layers or tuple(range(n_layers))
        return static, dyn, tuple(sorted(set(imp))), glob

    def schedule(self, ctx):
        c = self.config
        static, dyn, imp, glob = self._layers(ctx.n_layers)
        self.ema_layers = imp
        T = lookback(float(np.linalg.norm(self.motion[:3])), c.lookback_max, c.lookback_min)
        self.motion = np.zeros(7)
        precise = self.precise and c.controller
        self.k = [max(1, round(share * v.size)) for share, v in
                  zip(c.attn_keep_precise if precise else c.attn_keep, ctx.layout.views)]
        self.lookback_used = T
        stages, signals = [], []
        self.dynamic_tokens = torch.arange(ctx.layout.n_visual)
        if c.static and ctx.frames:  # no earlier frame: every patch dynamic, the static stages keep all
            self.dynamic_tokens = self._dynamic_tokens(ctx, T, precise)
            self.global_keep = self._global_keep(ctx)
            stages += [Stage(static[0], name=STATIC0), Stage(static[1], name=STATIC1)]
            signals += [attention(static[0], "text"), attention(static[1], "text")]
        if c.dynamic and dyn:
            self.importance = torch.zeros(ctx.layout.n_visual)
            self.applied: set[int] = set()
            self.dynamic_done = False
            stages += [Stage(l, name=DYNAMIC) for l in dyn]
            signals += [attention(l, "post_visual") for l in imp if l <= dyn[-1]]
        if c.static and c.use_global:
            signals += [attention(l, "text") for l in glob]
        return PrunePlan(tuple(stages), tuple(dict.fromkeys(signals)))

    def _dynamic_tokens(self, ctx, T: int, precise: bool) -> torch.Tensor:
        """Visual indices that changed since the frame T-1 steps back, or the oldest earlier frame
        when fewer were rendered (always kept). Needs at least one earlier frame."""
        c = self.config
        previous = ctx.frames[-min(T - 1, len(ctx.frames))]
        # cosine of raw patch pixels on the model's own grid, after its own preprocessing
        similarity = F.cosine_similarity(ctx.patch_pixels(ctx.observation.images),
                                         ctx.patch_pixels(previous), dim=-1, eps=1e-6)
        share = c.static_max_removed_precise if precise else c.static_max_removed
        # per view, the most similar patches above the threshold are static, at most a share of it
        most = torch.tensor([int(share * v.size) for v in ctx.layout.views])[ctx.layout.view_of_visual()]
        static = (similarity >= c.similarity_threshold) & (rank_in_view(similarity, ctx.layout) < most)
        return torch.nonzero(~static, as_tuple=True)[0]

    def _global_keep(self, ctx) -> torch.Tensor:
        if self.global_scores is None or not self.config.use_global:
            return torch.zeros(0, dtype=torch.long)
        return top_k_per_view(self.global_scores, self.k, ctx.layout)

    # ---------------------------------------------------------------- score / select
    def score(self, stage, signals, ctx):
        if stage.name == DYNAMIC:
            self._update_importance(stage.after_layer, signals, ctx)
            return self.importance.clone()
        return signals[attention(stage.after_layer, "text")]

    def select(self, stage, scores, ctx, layout):
        if stage.name == DYNAMIC:
            return self._select_dynamic(scores, layout)
        if stage.name == STATIC0:
            # per view: the top factor x k by layer-0 attention; its first k also survive layer 1
            factor_k = [self.config.layer0_factor * k for k in self.k]
            self.top_k_layer0, top = top_ks_per_view(scores, [self.k, factor_k], layout)
            keep = union(self.dynamic_tokens, self.global_keep, top)
        else:
            keep = union(self.dynamic_tokens, self.global_keep, self._top1(scores, layout),
                         self.top_k_layer0)
        if layout.n_present_visual() == layout.n_visual:  # nothing removed yet
            return keep
        return keep[torch.isin(keep, layout.present_visual())]

    def _top1(self, scores, layout) -> torch.Tensor:
        best = top_k_per_view(scores, self.k, layout)
        if not self.config.release_layer1_index_bug:
            return best
        # the release adds the view offset to the index *within the retained subset* of the view
        present = layout.present_visual()
        offsets = torch.tensor([v.start - layout.visual_start for v in layout.views])
        offset = offsets[layout.view_of_visual()[best]]
        return torch.searchsorted(present, best) - torch.searchsorted(present, offset) + offset

    def _update_importance(self, upto: int, signals, ctx) -> None:
        """EMA of rank weights over the importance layers that have run (<= upto), once each."""
        c = self.config
        for layer in self.ema_layers:  # sorted
            if layer > upto or layer in self.applied:
                continue
            self.applied.add(layer)
            attn = signals[attention(layer, "post_visual")]
            present = torch.nonzero(~torch.isnan(attn), as_tuple=True)[0]
            ranked = present[torch.argsort(attn[present], descending=True, stable=True)]
            weights = _rank_weights(ranked.numel(), layer)  # lam x linspace(10, 0.1)
            target = ranked
            if c.release_ema_index_bug:
                # the release writes rank j's score at the slot numbered by the token's *original*
                # position; in visual indices that is the token now at that slot, if visual
                target, weights = self._slots_as_visual(ranked, weights, present)
            current = self.importance[target]
            self.importance[target] = current + c.ema_alpha * (weights - current)

    @staticmethod
    def _slots_as_visual(ranked, weights, present):
        # visual tokens fill the slots after BOS in order, so slot (1 + visual index v) holds the
        # v-th present visual token while v < its count; larger v land on non-visual tokens
        ok = ranked < present.numel()
        return present[ranked[ok]], weights[ok]

    def _select_dynamic(self, scores, layout) -> torch.Tensor:
        present = layout.present_visual()
        if self.dynamic_done:
            return present
        c = self.config
        n_other = layout.current_length - present.numel()
        floor = int(c.dynamic_min_visual * layout.n_visual)
        n_visual = int(c.dynamic_keep_ratio * layout.current_length) - n_other
        if n_visual <= floor:
            n_visual, self.dynamic_done = floor, True
        return top_k(scores, max(1, min(n_visual, present.numel())), present)

    def on_forward_end(self, signals, record) -> None:
        if not (self.config.static and self.config.use_global):
            return
        layers = self._layers(len(record.tokens_per_layer))[3]
        stack = torch.stack([signals[attention(l, "text")] for l in layers])
        self.global_scores = torch.nan_to_num(stack, nan=0.0).mean(0)


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(SpecPruneVLA)
