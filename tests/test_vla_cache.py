"""VLA-Cache on hand-computed inputs (static patches, task relevance, the entropy schedule, counts per
layer) and end to end: dense first query, reuse at the configured layers, the cached keys and values
served, the shipped policy."""

import math

import numpy as np
import optuna
import pytest
import torch

from prunebench import BEFORE_LLM, Observation, PrunePlan, QueryContext, Strategy, TokenLayout, attention
from prunebench import attention_entropy as entropy_signal
from prunebench.engine.kv_cache import KVCache
from prunebench.engine.loop import PruningEngine
from prunebench.engine.transformers_compat import HAS_ATTENTION_REGISTRY
from prunebench.evaluation.runner import StreamRunner, run_stream
from prunebench.evaluation.streams import StreamQuery, SyntheticStream
from prunebench.plugins.manager import MANAGER
from prunebench.strategies.vla_cache import (
    VLACache,
    VLACacheConfig,
    patch_similarity,
    reusable_tokens,
    reuse_counts,
    reuse_proportions,
    share_count,
    static_patches,
)
from tests.conftest import TINY, make_observation

needs_registry = pytest.mark.skipif(not HAS_ATTENTION_REGISTRY, reason="reuse needs transformers >= 4.48")


def two_views(cols=4):
    return TokenLayout.build([("a", 1, cols), ("b", 1, cols)], 1, 4, 1, 1, 2)


# ----------------------------------------------------------------------------- static patches
def test_patch_similarity_by_hand():
    current = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    previous = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [4.0, 3.0]])
    # same direction 1; 45 degrees 1/sqrt(2); an all-black patch 0 (never static, as in the release);
    # (3,4).(4,3) / 25 = 24/25
    assert torch.allclose(patch_similarity(current, previous),
                          torch.tensor([1.0, 1 / math.sqrt(2), 0.0, 0.96]), atol=1e-6)


def test_static_patches_are_the_most_similar_above_the_threshold_per_view():
    layout = two_views()
    similarity = torch.tensor([1.0, 0.999, 0.997, 0.5,  # view a: three above 0.996, at most 2
                               0.997, 0.9955, 1.0, 0.9961])  # view b: 4, 6, 7 above; at most 4
    assert static_patches(similarity, 0.996, [2, 4], layout).tolist() == [0, 1, 4, 6, 7]
    assert static_patches(similarity, 0.9965, [2, 4], layout).tolist() == [0, 1, 4, 6]
    assert static_patches(similarity, 0.996, [0, 1], layout).tolist() == [6]
    # ties: the lower index first, as the release's stable sort of the raster-ordered list
    tied = torch.tensor([1.0, 1.0, 1.0, 0.2, 1.0, 1.0, 1.0, 1.0])
    assert static_patches(tied, 0.996, [2, 3], layout).tolist() == [0, 1, 4, 5, 6]


def test_the_task_relevant_patches_are_never_reusable():
    layout = two_views()
    static = torch.tensor([0, 1, 4, 6, 7])
    relevance = torch.tensor([0.1, 0.5, 0.0, 0.0, 0.3, 0.2, 0.9, 0.0])
    # view a's top 1 is patch 1; view b's top 2 are 6 (0.9) and 4 (0.3)
    assert reusable_tokens(static, relevance, [1, 2], layout).tolist() == [0, 7]
    assert reusable_tokens(static, relevance, [4, 4], layout).tolist() == []


def test_counts_given_for_256_patch_views_are_shares():
    c = VLACacheConfig()
    assert share_count(c.static_share, 256) == 150 and share_count(c.relevant_share, 256) == 100
    assert share_count(c.static_share, 64) == 38 and share_count(c.relevant_share, 64) == 25  # 37.5 up


# ----------------------------------------------------------------------------- the schedule
def test_entropy_to_proportion_with_damping_by_hand():
    e = torch.tensor([2.0, 1.0, 3.0, 1.5, 2.5])
    # min-max: (0.5, 0, 1, 0.25, 0.75); reuse = 1 - that = (0.5, 1, 0, 0.75, 0.25)
    assert torch.allclose(reuse_proportions(e, damp=False), torch.tensor([0.5, 1.0, 0.0, 0.75, 0.25]))
    # upward steps damped by 0.55 on the damped values: 0.5 + 0.5 * 0.55 = 0.775; 0 stays;
    # 0 + 0.75 * 0.55 = 0.4125; 0.25 < 0.4125 stays
    assert torch.allclose(reuse_proportions(e), torch.tensor([0.5, 0.775, 0.0, 0.4125, 0.25]))
    assert torch.allclose(reuse_proportions(e, growth=1.0), torch.tensor([0.5, 1.0, 0.0, 0.75, 0.25]))


def test_count_per_layer_is_floor_at_least_one_and_never_shrinks():
    # floor(0.5 * 10) = 5, floor(7.75) = 7, floor(0) -> 1 but not fewer than 7, floor(4.125) -> 7
    assert reuse_counts(torch.tensor([0.5, 0.775, 0.0, 0.4125]), 10).tolist() == [5, 7, 7, 7]
    assert reuse_counts(torch.tensor([0.05, 0.3, 1.0]), 10).tolist() == [1, 3, 10]


def hand_context(layout, current, n_layers=4, query_index=1):
    obs = Observation({}, np.zeros(8, np.float32), "")
    return QueryContext(observation=obs, layout=layout, n_layers=n_layers, query_index=query_index,
                        patch_pixels=lambda images: current)


def test_the_plan_reuses_the_first_tokens_of_the_reusable_list_per_layer():
    layout = TokenLayout.build([("a", 2, 4), ("b", 2, 4)], 1, 4, 1, 1, 2)  # 8 + 8 patches
    current = torch.rand(16, 12, generator=torch.Generator().manual_seed(0)) + 0.1
    s = VLACache(VLACacheConfig(static_share=1.0, relevant_share=2 / 8))
    s.previous_pixels = current.clone()  # the same frame: every patch static
    s.relevance = torch.arange(16.0)  # top 2 per view: 6, 7 and 14, 15
    s.proportions = torch.tensor([0.5, 0.775, 0.0, 0.4])  # per layer of a 4-layer model
    ctx = hand_context(layout, current)
    plan = s.schedule(ctx)
    reusable = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert s.reusable.tolist() == reusable
    # reuse layers {2, 6, 9, 11} of 32 -> {0, 1} of 4: floor(0.5 * 12) = 6 from layer 0, floor(9.3) = 9
    # from layer 1, the first of the list (view a first, raster order)
    assert [(st.after_layer, st.verb) for st in plan.stages] == [(BEFORE_LLM, "reuse"), (0, "reuse")]
    assert s.reused[BEFORE_LLM].tolist() == reusable[:6] and s.reused[0].tolist() == reusable[:9]
    keep = s.select(plan.stages[0], s.score(plan.stages[0], ctx.signals, ctx), ctx, layout)
    assert keep.tolist() == [6, 7, *range(8, 16)]
    assert entropy_signal(3, "all") in plan.signals  # the next query's schedule needs every layer
    assert attention(2, "post_visual", per_row=True) in plan.signals  # relevance: 15 of 32 -> 2

    # the most similar first instead of the release's order
    s2 = VLACache(VLACacheConfig(static_share=1.0, relevant_share=2 / 8, reuse_order="similarity"))
    s2.previous_pixels = current.clone()
    s2.previous_pixels[1:4] = current[1:4] + torch.tensor([[0.01], [0.02], [0.03]])  # less and less similar
    s2.relevance, s2.proportions = s.relevance, s.proportions
    s2.schedule(hand_context(layout, current))
    assert sorted(s2.reusable[:9].tolist()) == [0, 4, 5, 8, 9, 10, 11, 12, 13]  # similarity 1 (rounding decides)
    assert s2.reusable[9:].tolist() == [1, 2, 3]
    assert s2.reused[BEFORE_LLM].tolist() == sorted(s2.reusable[:6].tolist())

    # without the entropy schedule every reusable token is reused from the first reuse layer on
    flat = VLACache(VLACacheConfig(static_share=1.0, relevant_share=2 / 8, layer_adaptive=False))
    flat.previous_pixels, flat.relevance = current.clone(), s.relevance
    plan = flat.schedule(hand_context(layout, current))
    assert [st.after_layer for st in plan.stages] == [BEFORE_LLM] and flat.reused[BEFORE_LLM].tolist() == reusable
    assert not any(r.kind == "attention_entropy" for r in plan.signals)


def test_dense_without_a_previous_query_or_a_reusable_token():
    layout = two_views()
    current = torch.rand(8, 12, generator=torch.Generator().manual_seed(1)) + 0.1
    s = VLACache()
    assert s.schedule(hand_context(layout, current, query_index=0)).is_dense  # nothing cached yet
    s.relevance, s.proportions = torch.zeros(8), torch.ones(4)
    s.previous_pixels = current.flip(0)  # other patches everywhere: nothing static
    assert s.schedule(hand_context(layout, current)).is_dense and s.reusable.numel() == 0
    # an episode's first query forgets the previous episode
    s.previous_pixels = current.clone()
    assert s.schedule(hand_context(layout, current, query_index=0)).is_dense
    assert s.relevance is None


def test_the_release_same_frame_bug_compares_the_frame_with_itself():
    layout = two_views()
    # integer patches with integer norms: a patch against itself has similarity exactly 1, so the
    # ties are broken by index
    current = torch.tensor([[3.0, 4], [4, 3], [0, 5], [5, 0], [6, 8], [8, 6], [0, 2], [2, 0]])
    assert torch.equal(patch_similarity(current, current), torch.ones(8))
    s = VLACache(VLACacheConfig(release_same_frame_bug=True))
    s.relevance, s.proportions = torch.arange(8.0), torch.ones(4)
    s.previous_pixels = current.flip(0)  # ignored: the frame is compared with itself
    plan = s.schedule(hand_context(layout, current))
    # 150/256 of 4 -> 2 static per view (the lowest indices of the ties), minus the top 100/256 of 4
    # -> 2 relevant per view (the highest indices): patches 0, 1 and 4, 5, reused from layer 0
    assert s.reusable.tolist() == [0, 1, 4, 5] and [st.after_layer for st in plan.stages] == [BEFORE_LLM]
    fixed = VLACache()  # the previous query's frame: patch 0 (3, 4) against (2, 0) is 0.6, ...
    fixed.relevance, fixed.proportions, fixed.previous_pixels = s.relevance, s.proportions, current.flip(0)
    assert fixed.schedule(hand_context(layout, current)).is_dense and fixed.reusable.numel() == 0


# ----------------------------------------------------------------------------- end to end
class Probe(Strategy):
    """Dense: records what VLA-Cache reads at forward end (relevance rows, per-layer entropy)."""

    name = "probe"

    def schedule(self, ctx):
        return PrunePlan.dense((attention(2, "post_visual", per_row=True),
                                *(entropy_signal(l, "all") for l in range(ctx.n_layers))))

    def on_forward_end(self, signals, record):
        self.rows = signals[attention(2, "post_visual", per_row=True)]
        self.entropies = torch.cat([signals[entropy_signal(l, "all")] for l in range(4)])


def stream_of(observations):
    return [StreamQuery(o, step_index=8 * i) for i, o in enumerate(observations)]


def top_per_view(scores, k, size=16):
    """The top ``k`` of each ``size``-patch view by ``scores`` (ties: lower index), as visual indices."""
    views = scores.nan_to_num().view(-1, size)
    order = torch.sort(views, dim=1, descending=True, stable=True).indices[:, :k]
    return sorted((order + torch.arange(views.shape[0])[:, None] * size).flatten().tolist())


@needs_registry
def test_identical_frames_reuse_every_non_relevant_patch_at_the_configured_layers(tiny_model):
    a, b = make_observation(seed=1), make_observation(seed=2)
    probe = Probe()
    PruningEngine(tiny_model).query(probe, a)
    relevance = probe.rows[:34].mean(0)  # the 34 rows after the images: proprio, prompt, action slots
    s = VLACache(VLACacheConfig(static_share=1.0))
    runner = StreamRunner(PruningEngine(tiny_model), s)
    runner.start(a.instruction)
    first = runner.query(a, 0)
    assert first.record.dense and first.record.keys_per_layer is None  # the first query fills the cache
    # what the strategy carries to the next query: the relevance rows and the per-layer schedule
    assert torch.allclose(s.relevance, relevance, atol=1e-6)
    proportions = reuse_proportions(probe.entropies)
    assert torch.allclose(s.proportions, proportions, atol=1e-5)

    second = runner.query(a, 8)  # the same frame: every patch static
    n = tiny_model.encode(a).layout.n_visual  # 2 views x 16
    expected = sorted(set(range(n)) - set(top_per_view(relevance, 6)))  # 100/256 of 16 -> 6 per view
    assert s.reusable.tolist() == expected and len(expected) == 20
    counts = reuse_counts(proportions[torch.tensor([0, 1])], 20).tolist()  # reuse layers {0, 1} of 4
    record = second.record
    # counts[0] tokens are not computed from layer 0 on, counts[1] from layer 1 on
    assert record.visual_per_layer == [n - counts[0], n - counts[1], n - counts[1], n - counts[1]]
    assert record.keys_per_layer == [t + n - v for t, v in zip(record.tokens_per_layer, record.visual_per_layer)]
    assert all(k > t for k, t in zip(record.keys_per_layer, record.tokens_per_layer))

    third = runner.query(b, 16)  # a new random frame: nothing static, nothing reused
    assert not third.record.stages and third.record.keys_per_layer is None


@needs_registry
def test_later_queries_reuse_from_the_first_reuse_layer_on():
    """Defaults, reuse layers {2, 6, 9, 11} of 32 mapped onto 8 layers ({1, 2, 3}): a frame that
    changed in one view reuses only the other view's static, non-relevant patches."""
    from prunebench.models.mini_oft import MiniOFT

    model = MiniOFT.random(TINY.model_copy(update={"n_layers": 8}), seed=0)
    a = make_observation(seed=1)
    changed = Observation({"agentview": make_observation(seed=5).images["agentview"],
                           "wrist": a.images["wrist"]}, a.proprio, a.instruction)
    s = MANAGER.create("vla-cache")
    assert s.layers(8) == ((1, 2, 3), 4)
    runner = StreamRunner(PruningEngine(model), s)
    runner.start(a.instruction)
    assert runner.query(a, 0).record.dense
    for step, view_b_only in ((8, True), (16, False)):  # then the same changed frame again
        record = runner.query(changed, step).record
        assert record.stages and {st.verb for st in record.stages} == {"reuse"}
        # 150/256 of 16 -> 9 static per static view, minus the 6 relevant: 3 .. 9 reusable
        views = 1 if view_b_only else 2
        assert 3 * views <= s.reusable.numel() <= 9 * views
        assert (s.reusable.min() >= 16) == view_b_only
        where = record.stages[0].where  # the first layer with reused tokens is the one after it
        first = 0 if where == "before_llm" else int(where.rsplit("_", 1)[1]) + 1
        keys, tokens = record.keys_per_layer, record.tokens_per_layer
        assert first >= 1 and keys[:first] == tokens[:first]
        assert all(k > t for k, t in zip(keys[first:], tokens[first:]))


@needs_registry
def test_reused_keys_and_values_are_the_previous_querys(tiny_model, monkeypatch):
    engine = PruningEngine(tiny_model)
    s = VLACache(VLACacheConfig(static_share=1.0))
    a, other = make_observation(seed=1), make_observation(seed=3)
    # the second frame: view a changed, view b the same; another proprio
    b = Observation({"agentview": other.images["agentview"], "wrist": a.images["wrist"]}, other.proprio,
                    a.instruction)
    runner = StreamRunner(engine, s)
    runner.start(a.instruction)
    runner.query(a, 0)
    cache = engine.kv_cache(s, 1)
    previous = {layer: (k.clone(), v.clone()) for layer, (k, v, _) in cache._layers.items()}
    served = []
    fetch = KVCache.fetch
    monkeypatch.setattr(KVCache, "fetch", lambda self, layer, positions: served.append(
        (layer, positions.clone(), fetch(self, layer, positions))) or served[-1][2])
    result = runner.query(b, 8)
    start = tiny_model.encode(a).layout.visual_start
    assert s.reusable.numel() == 10 and s.reusable.min() >= 16  # view b: 16 static minus 6 relevant
    assert [layer for layer, _, _ in served] == list(range(TINY.n_layers))  # reused from layer 0 on
    for layer, positions, (key, value) in served:
        point = max(p for p in s.reused if p < layer)  # the last reuse stage before this layer
        assert torch.equal(positions, s.reused[point] + start)
        assert torch.equal(key, previous[layer][0][:, :, positions])
        assert torch.equal(value, previous[layer][1][:, :, positions])
    # the computed tokens' entries were refreshed by this query (another frame, another proprio)
    computed = torch.arange(16) + start
    assert not torch.equal(cache._layers[3][0][:, :, computed], previous[3][0][:, :, computed])
    assert result.record.keys_per_layer[0] > result.record.tokens_per_layer[0]


def test_the_shipped_policy_runs_it():
    from prunebench.models import load_model

    model, _ = load_model()
    stream = list(SyntheticStream(n_queries=3, seed=0, image_size=128))
    # the first frame again: static everywhere, its own keys and values in the cache
    stream.insert(1, StreamQuery(stream[0].observation, stream[0].step_index + 8))
    engine = PruningEngine(model)
    dense = [engine.query(MANAGER.create("none"), q.observation).normalized for q in stream]
    if not HAS_ATTENTION_REGISTRY:
        pytest.skip("reuse needs transformers >= 4.48")
    s = MANAGER.create("vla-cache")
    results = run_stream(engine, s, stream)
    assert results[0].record.dense
    # 64-patch views: 38 static per view, minus 25 relevant -> at most 26 reusable
    record = results[1].record
    assert record.stages and record.keys_per_layer is not None
    assert 1 <= 128 - record.visual_per_layer[-1] <= 2 * 13  # 64-patch views: 38 static - 25 relevant
    for r in results:
        assert np.isfinite(r.actions).all()
    # the same frame served from its own cache: the dense actions, up to float rounding
    assert np.allclose(results[1].normalized, dense[1], atol=1e-4)


def test_registered_built_in_with_a_search_space():
    from prunebench.study.space import SearchTrial, parameters

    assert MANAGER.strategies()["vla-cache"].plugin == "prunebench.strategies.vla_cache"
    assert "vla-cache" in MANAGER.builtin_strategies()
    s = MANAGER.create("vla-cache", {"release_same_frame_bug": True})
    assert s.reuses_kv and s.position_ids == "original" and s.config.release_same_frame_bug
    trial = optuna.trial.FixedTrial({"similarity_threshold": 0.99, "static_share": 0.5,
                                     "relevant_share": 0.2, "growth_factor": 0.3})
    config = VLACacheConfig.search_space(SearchTrial(trial, {}, {}, n_layers=4))
    assert config == VLACacheConfig(similarity_threshold=0.99, static_share=0.5, relevant_share=0.2,
                                    growth_factor=0.3)
    assert parameters("vla-cache", 32)["static_share"] == ("float", [0.1, 0.95])
