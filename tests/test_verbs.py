"""The stage verbs beyond dropping: merge (fold removed tokens into kept ones) and reuse (serve a
token's keys and values from the previous query's cache)."""

import pytest
import torch

from prunebench import BEFORE_LLM, Assignment, PrunePlan, Stage, StrategyError, attention
from prunebench.contract.layout import TokenLayout
from prunebench.engine.accounting import llm_flops
from prunebench.engine.kv_cache import KVCache
from prunebench.engine.loop import PruningEngine
from prunebench.engine.merging import merge_visual
from prunebench.engine.transformers_compat import HAS_ATTENTION_REGISTRY
from prunebench.plugins.manager import MANAGER
from tests.conftest import TINY, make_observation
from tests.helpers import FixedPlan

needs_registry = pytest.mark.skipif(not HAS_ATTENTION_REGISTRY, reason="reuse needs transformers >= 4.48")


class Merges(FixedPlan):
    """A merge stage at ``point``: keeps ``keep_fn``'s tokens, folds every other one into the kept
    token just before it in visual order (the first kept one for those before any)."""

    name = "merges"

    def __init__(self, point, keep_fn=None, proportional=False):
        super().__init__([Stage(point, verb="merge")], keep_fn=keep_fn)
        self.plan = PrunePlan(self.plan.stages, proportional_attention=proportional)

    def assign(self, stage, keep, ctx, layout):
        present = layout.present_visual()
        removed = present[~torch.isin(present, keep)]
        into = keep[(torch.searchsorted(keep, removed) - 1).clamp(min=0)]
        return Assignment(removed, into)


class Reuses(FixedPlan):
    """A reuse stage at ``point`` from the second query on: keeps ``keep_fn``'s tokens computing."""

    name = "reuses"
    reuses_kv = True

    def __init__(self, point, keep_fn):
        super().__init__([Stage(point, verb="reuse")], keep_fn=keep_fn)

    def schedule(self, ctx):
        return self.plan if ctx.query_index > 0 else PrunePlan.dense()


def dense(engine, obs):
    return engine.query(MANAGER.create("none"), obs)


# ------------------------------------------------------------------ merge
def test_merge_is_the_size_weighted_mean_and_sizes_add_up():
    layout = TokenLayout.build([("a", 1, 4)], 1, 2, 0, 0, 2)  # BOS | 4 visual | proprio | 2 prompt | ...
    h = torch.zeros(1, layout.length, 2)
    h[0, 1:5] = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, 8.0]])
    sizes = torch.tensor([1.0, 1.0, 2.0, 1.0])
    keep, removed, into = torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 3])
    merged = merge_visual(h, layout, keep, removed, into, None, sizes)
    # token 0 absorbs token 1: (1*[1,0] + 1*[3,0]) / 2; token 3 absorbs token 2 of size 2: (1*[0,8] + 2*[0,4]) / 3
    assert torch.allclose(merged[0], torch.tensor([[2.0, 0.0], [0.0, 16 / 3]]))
    assert sizes.tolist() == [2.0, 1.0, 2.0, 3.0]  # the kept tokens hold what they absorbed
    weighted = merge_visual(h, layout, keep, removed, into, torch.tensor([3.0, 1.0]), torch.ones(4))
    assert torch.allclose(weighted[0], torch.tensor([[2.5, 0.0], [0.0, 6.0]]))  # (1 + 3*3) / 4; (8 + 4) / 2


@pytest.mark.parametrize("point", [BEFORE_LLM, 1])
def test_a_keep_everything_merge_reproduces_the_dense_forward(engine, obs, point):
    merged = engine.query(Merges(point), obs)
    assert merged.record.stages[0].verb == "merge"
    assert torch.equal(torch.as_tensor(merged.actions), torch.as_tensor(dense(engine, obs).actions))


def test_merging_changes_the_kept_tokens_and_proportional_attention_weighs_them(engine, obs):
    every_other = lambda stage, layout: layout.present_visual()[::2]
    dropped = engine.query(FixedPlan([Stage(1)], keep_fn=every_other), obs)
    merged = engine.query(Merges(1, every_other), obs)
    proportional = engine.query(Merges(1, every_other, proportional=True), obs)
    assert merged.record.tokens_per_layer == dropped.record.tokens_per_layer  # a merged token counts once
    assert merged.record.llm_flops == dropped.record.llm_flops
    assert not torch.allclose(torch.as_tensor(merged.actions), torch.as_tensor(dropped.actions))
    assert not torch.allclose(torch.as_tensor(proportional.actions), torch.as_tensor(merged.actions))
    # until a merge folds a token, no size bias is passed at all: the dense forward, bit for bit
    keep_all = engine.query(Merges(1, proportional=True), obs)
    assert torch.equal(torch.as_tensor(keep_all.actions), torch.as_tensor(dense(engine, obs).actions))


def test_proportional_attention_before_transformers_4_48_goes_through_the_zero_mask(tiny_model, obs,
                                                                                    monkeypatch):
    import prunebench.engine.loop as engine_module
    import prunebench.engine.transformers_compat as compat

    every_other = lambda stage, layout: layout.present_visual()[::2]
    strategy = Merges(1, every_other, proportional=True)
    strategy.plan = PrunePlan(strategy.plan.stages, (attention(2, "text"),), proportional_attention=True)
    seen = []
    strategy.on_forward_end = lambda signals, record: seen.append(signals[attention(2, "text")])
    registry = PruningEngine(tiny_model).query(strategy, obs)
    monkeypatch.setattr(compat, "NEEDS_ZERO_MASK", True)
    monkeypatch.setattr(engine_module, "HAS_ATTENTION_REGISTRY", False)
    old = PruningEngine(tiny_model).query(strategy, obs)
    assert torch.allclose(torch.as_tensor(old.actions), torch.as_tensor(registry.actions), atol=1e-5)
    assert torch.allclose(seen[0], seen[1], atol=1e-6, equal_nan=True)  # recomputed signals see the bias


@pytest.mark.parametrize("assignment, message", [
    (lambda keep, removed: Assignment(removed[[0, 0]], keep[:1].expand(2)), "at most once"),
    (lambda keep, removed: Assignment(keep[:1], keep[1:2]), "not kept, each"),
    (lambda keep, removed: Assignment(removed, removed), "not kept"),
    (lambda keep, removed: Assignment(removed, keep[:1].expand(len(removed)), -torch.ones(len(removed))),
     "positive"),
    (lambda keep, removed: "nope", "must return an Assignment"),
])
def test_bad_assignments_name_the_strategy(engine, obs, assignment, message):
    class Bad(Merges):
        name = "bad-merge"

        def assign(self, stage, keep, ctx, layout):
            present = layout.present_visual()
            return assignment(keep, present[~torch.isin(present, keep)])

    with pytest.raises(StrategyError, match=f"bad-merge.*{message}"):
        engine.query(Bad(1, lambda stage, layout: layout.present_visual()[::2]), obs)


def test_tokens_an_assignment_does_not_name_are_dropped(engine, obs):
    every_other = lambda stage, layout: layout.present_visual()[::2]

    class Partial(Merges):
        def assign(self, stage, keep, ctx, layout):
            return Assignment(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    partial = engine.query(Partial(1, every_other), obs)
    dropped = engine.query(FixedPlan([Stage(1)], keep_fn=every_other), obs)
    assert torch.equal(torch.as_tensor(partial.actions), torch.as_tensor(dropped.actions))


def test_a_merge_stage_without_assign_is_a_strategy_error(engine, obs):
    with pytest.raises(StrategyError, match="fixed-plan.*has no assign"):
        engine.query(FixedPlan([Stage(1, verb="merge")], keep_fn=lambda s, layout: layout.present_visual()[:3]),
                     obs)


# ------------------------------------------------------------------ reuse
@needs_registry
def test_reusing_every_visual_token_of_the_same_frame_reproduces_the_dense_forward(tiny_model, obs):
    engine = PruningEngine(tiny_model)
    strategy = Reuses(BEFORE_LLM, keep_fn=lambda stage, layout: layout.present_visual()[:1])
    first = engine.query(strategy, obs, query_index=0)
    second = engine.query(strategy, obs, query_index=1)
    reference = torch.as_tensor(dense(engine, obs).actions)
    assert torch.equal(torch.as_tensor(first.actions), reference)
    # keys and values of the same frame, served from the cache: the same attention, summed in
    # another order
    assert torch.allclose(torch.as_tensor(second.actions), reference, atol=1e-5)
    n_visual = second.record.stages[0].visual_before
    assert second.record.visual_per_layer == [1] * TINY.n_layers
    assert second.record.keys_per_layer == [t + n_visual - 1 for t in second.record.tokens_per_layer]


@needs_registry
def test_reused_keys_and_values_are_the_previous_querys(tiny_model, monkeypatch):
    engine = PruningEngine(tiny_model)
    strategy = Reuses(1, keep_fn=lambda stage, layout: layout.present_visual()[::2])
    engine.query(strategy, make_observation(seed=1), query_index=0)
    cache = engine.kv_cache(strategy, 1)
    previous = {layer: (k.clone(), v.clone()) for layer, (k, v, _) in cache._layers.items()}
    served = []
    fetch = KVCache.fetch
    monkeypatch.setattr(KVCache, "fetch", lambda self, layer, positions: served.append(
        (layer, positions.clone(), fetch(self, layer, positions))) or served[-1][2])
    result = engine.query(strategy, make_observation(seed=2), query_index=1)
    layout = tiny_model.encode(make_observation(seed=2)).layout
    odd = torch.arange(1, layout.n_visual, 2) + layout.visual_start  # the reused tokens' positions
    assert [layer for layer, _, _ in served] == list(range(2, TINY.n_layers))  # reuse starts after layer 1
    for layer, positions, (key, value) in served:
        assert torch.equal(positions, odd)
        assert torch.equal(key, previous[layer][0][:, :, odd])
        assert torch.equal(value, previous[layer][1][:, :, odd])
    # the computed tokens' entries were refreshed by this query, the reused ones' were not
    now = cache._layers[3][0]
    assert torch.equal(now[:, :, odd], previous[3][0][:, :, odd])
    assert not torch.equal(now[:, :, odd - 1], previous[3][0][:, :, odd - 1])
    record = result.record
    assert record.keys_per_layer[:2] == record.tokens_per_layer[:2]
    assert all(k == t + odd.numel() for k, t in zip(record.keys_per_layer[2:], record.tokens_per_layer[2:]))


@needs_registry
def test_the_cache_is_emptied_at_each_episodes_first_query(tiny_model, obs):
    engine = PruningEngine(tiny_model)
    strategy = Reuses(1, keep_fn=lambda stage, layout: layout.present_visual()[::2])
    engine.query(strategy, obs, query_index=0)
    engine.query(strategy, obs, query_index=1)
    assert engine.kv_cache(strategy, 0)._layers == {}
    assert engine.kv_cache(MANAGER.create("none"), 1) is None  # only a strategy that asks has one


@needs_registry
def test_reuse_errors_name_the_strategy(tiny_model, obs):
    engine = PruningEngine(tiny_model)

    class Eager(Reuses):
        name = "eager-reuse"

        def schedule(self, ctx):
            return self.plan  # reuses at the episode's first query: nothing is cached yet

    with pytest.raises(StrategyError, match="eager-reuse.*no earlier query of this episode computed"):
        engine.query(Eager(1, keep_fn=lambda stage, layout: layout.present_visual()[::2]), obs)

    class Undeclared(FixedPlan):
        name = "undeclared"

    with pytest.raises(StrategyError, match="undeclared.*reuses_kv"):
        engine.query(Undeclared([Stage(1, verb="reuse")]), obs)

    recompacted = Reuses(1, keep_fn=lambda stage, layout: layout.present_visual()[::2])
    recompacted.position_ids = "recompact"
    with pytest.raises(StrategyError, match="reuses.*original"):
        engine.query(recompacted, obs, query_index=1)


def test_flops_count_reused_tokens_as_keys_only():
    d, m = 8, 16
    # 10 computed tokens attending to 14 keys: projections and MLP for 10, attention 10 x 14
    assert llm_flops([10], d, m, [14]) == 2 * (4 * 10 * d * d + 2 * 10 * 14 * d + 3 * 10 * d * m)
    assert llm_flops([10, 6], d, m) == llm_flops([10, 6], d, m, [10, 6])
