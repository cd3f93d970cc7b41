"""ToMe: bipartite soft matching on hand-computed keys, the size-weighted merge and proportional
attention through the engine, the schedule of merges, end to end on the tiny and shipped models."""

import math

import numpy as np
import optuna
import pytest
import torch

import prunebench.strategies.tome as tome_module
from prunebench import Observation, QueryContext, TokenLayout, visual_keys
from prunebench.engine.loop import PruningEngine
from prunebench.plugins.manager import MANAGER
from prunebench.strategies.tome import ToMe, ToMeConfig, bipartite_soft_matching, parse_r, spread
from tests.conftest import TINY, make_observation


def at(degrees, norm=1.0):
    """A 2-D key at an angle: the cosine of two of them is cos(the angle between them)."""
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


# Two views of 6 and 2 tokens. View 0: B = 0, 2, 4 and A = 1, 3, 5 (first token B, then alternating).
# Edges by cosine: 1 -> 0 (10 degrees apart), 3 -> 2 (5), 5 -> 4 (30; 5 -> 2 is 60). Token 5 is
# 100 times longer and token 1 ten times shorter: by dot product 5 -> 4 would be the best edge.
# View 1: B = 6, A = 7; 7 equals token 0 (cosine 1) but may only merge within its view, into 6 (90).
KEYS = torch.tensor([at(0), at(10, 0.1), at(90), at(85), at(180), at(150, 100.0), at(90), at(0)])
TWO_VIEWS = TokenLayout.build([("a", 2, 3), ("b", 1, 2)], 1, 4, 1, 1, 2)


def test_bipartite_matching_by_hand():
    order, pool = torch.arange(8), torch.tensor([0] * 6 + [1] * 2)
    keep, removed, into, (a, best), after = bipartite_soft_matching(KEYS, order, pool, torch.tensor([2, 1]),
                                                                    release_order=True)
    assert a.tolist() == [1, 3, 5, 7]
    cos = lambda deg: math.cos(math.radians(deg))
    assert torch.allclose(best, torch.tensor([cos(10), cos(5), cos(30), cos(90)]), atol=1e-6)
    # view 0 merges its 2 best edges (3 -> 2, then 1 -> 0), 5 stays; view 1 merges 7 -> 6
    assert sorted(zip(removed.tolist(), into.tolist())) == [(1, 0), (3, 2), (7, 6)]
    assert keep.tolist() == [0, 2, 4, 5, 6]
    # the release's order after the merge: each pool's unmerged A tokens, then its B tokens
    assert after.tolist() == [5, 0, 2, 4, 6]
    # r = 1: only the best edge; r = 0: nothing; r beyond the A tokens: every A token (ToMe's cap)
    keep, removed, into, _, _ = bipartite_soft_matching(KEYS, order, pool, torch.tensor([1, 0]))
    assert (removed.tolist(), into.tolist(), keep.tolist()) == ([3], [2], [0, 1, 2, 4, 5, 6, 7])
    assert bipartite_soft_matching(KEYS, order, pool, torch.tensor([0, 0]))[0].tolist() == list(range(8))
    keep, removed, into, _, _ = bipartite_soft_matching(KEYS, order, pool, torch.tensor([9, 9]))
    assert keep.tolist() == [0, 2, 4, 6] and sorted(zip(removed.tolist(), into.tolist()))[2] == (5, 4)
    # one pool over both views: 7 now merges into 0 (cosine 1), the best edge of all
    keep, removed, into, _, _ = bipartite_soft_matching(KEYS, order, torch.zeros(8, dtype=torch.long),
                                                        torch.tensor([1]))
    # (in one pool of 8, B = 0, 2, 4, 6 and A = 1, 3, 5, 7: 7's most similar B token is 0)
    assert (removed.tolist(), into.tolist()) == ([7], [0])


def test_ties_merge_the_earlier_a_token_into_the_first_b_token():
    # B = 0, 2 identical, A = 1, 3 identical: every edge has cosine 1
    keys = torch.tensor([at(0), at(0), at(0), at(0)])
    keep, removed, into, _, _ = bipartite_soft_matching(keys, torch.arange(4), torch.zeros(4, dtype=torch.long),
                                                        torch.tensor([1]))
    assert (removed.tolist(), into.tolist(), keep.tolist()) == ([1], [0], [0, 2, 3])


def test_the_alternation_follows_the_given_order():
    # the order 5, 0, 2, 4 (the release's after the first merge): B = 5, 2 and A = 0, 4
    keep, removed, into, (a, _), _ = bipartite_soft_matching(KEYS, torch.tensor([5, 0, 2, 4]),
                                                             torch.zeros(4, dtype=torch.long), torch.tensor([1]))
    assert a.tolist() == [0, 4]
    assert (removed.tolist(), into.tolist()) == ([4], [5])  # 4 -> 5 (30 degrees) beats 0 -> 2 (90)


def context(layout, n_layers=4):
    return QueryContext(observation=Observation({}, np.zeros(8, np.float32), ""), layout=layout, n_layers=n_layers)


def test_the_strategy_scores_selects_and_assigns_the_matching():
    s = MANAGER.create("tome", {"r": 2, "first_layer": 1, "last_layer": 1})
    ctx = context(TWO_VIEWS)
    plan = s.schedule(ctx)
    assert [(st.after_layer, st.verb) for st in plan.stages] == [(1, "merge")]
    assert plan.signals == (visual_keys(1),) and plan.proportional_attention
    ctx.signals[visual_keys(1)] = KEYS
    stage = plan.stages[0]
    scores = s.score(stage, ctx.signals, ctx)
    assert torch.isinf(scores[[0, 2, 4, 6]]).all()  # B tokens are never merged
    assert torch.allclose(scores[[1, 3, 5]], -torch.tensor([math.cos(math.radians(d)) for d in (10, 5, 30)]))
    keep = s.select(stage, scores, ctx, TWO_VIEWS)
    assignment = s.assign(stage, keep, ctx, TWO_VIEWS)
    # r = 2 per view; view 1 has one A token, so it merges that one only
    assert keep.tolist() == [0, 2, 4, 5, 6]
    assert sorted(zip(assignment.removed.tolist(), assignment.into.tolist())) == [(1, 0), (3, 2), (7, 6)]
    assert assignment.weight is None  # the engine weighs by size: ToMe's merge_wavg


# ------------------------------------------------------------------ the schedule
def test_parse_r_is_the_releases():
    assert parse_r(4, 0.0, 3) == [4, 4, 4]
    assert parse_r(4, -1.0, 3) == [8, 4, 0]  # the paper's decreasing schedule
    assert parse_r(5, 0.5, 4) == [2, 4, 6, 8]  # int(5 * 0.5) = 2 up to 2 * 5 - 2 = 8
    assert parse_r(3, 0.0, 1) == [3]


def test_keep_ratio_spreads_the_removals_evenly():
    assert spread(torch.tensor([32]), 0.0, 3)[:, 0].tolist() == [11, 10, 11]  # 10.7, 21.3, 32 rounded
    assert spread(torch.tensor([128]), 0.0, 29).sum().item() == 128
    assert set(spread(torch.tensor([128]), 0.0, 29)[:, 0].tolist()) == {4, 5}
    assert spread(torch.tensor([12]), -1.0, 3)[:, 0].tolist() == [8, 4, 0]


def test_default_layers_and_counts_scale_with_the_depth():
    oft = TokenLayout.build([("a", 16, 16), ("b", 16, 16)], 1, 20, 9, 3, 56)
    s = ToMe()
    plan = s.schedule(context(oft, n_layers=32))
    assert [st.after_layer for st in plan.stages] == list(range(2, 31))  # 2 of 32 .. n_layers - 2
    counts = s.counts(context(oft, n_layers=32))
    assert torch.stack(list(counts.values())).sum(dim=0).tolist() == [128, 128]  # 256 -> 128 per view
    assert [st.after_layer for st in ToMe().schedule(context(TWO_VIEWS)).stages] == [0, 1, 2]
    assert ToMe({"first_layer": 1, "last_layer": 1}).schedule(context(TWO_VIEWS)).stages[0].after_layer == 1


def test_config_rules():
    with pytest.raises(ValueError, match="not both"):
        ToMeConfig(keep_ratio=0.5, r=4)
    with pytest.raises(ValueError, match="first_layer"):
        ToMeConfig(first_layer=3, last_layer=1)
    assert ToMeConfig(r=4).r == 4


# ------------------------------------------------------------------ through the engine
def dense_actions(engine, obs):
    return torch.as_tensor(engine.query(MANAGER.create("none"), obs).actions)


@pytest.mark.parametrize("config", [{"r": 0}, {"keep_ratio": 1.0}])
def test_merging_nothing_is_the_dense_forward(engine, obs, config):
    out = engine.query(MANAGER.create("tome", config), obs)
    assert out.record.dense and not out.record.stages
    assert torch.equal(torch.as_tensor(out.actions), dense_actions(engine, obs))


def test_tokens_per_layer_shrink_as_configured(engine, obs):
    # the tiny model: 4 layers, two 4x4 views; merges after layers 0, 1, 2
    n_other = engine.query(MANAGER.create("none"), obs).record.tokens_per_layer[0] - 32
    for config, visual in [({}, [32, 26, 22, 16]),  # 16 -> 8 per view: 3, 2, 3
                           ({"r": 3}, [32, 26, 20, 14]),  # 16 -> 13 -> 10 -> 7 per view
                           ({"r": 100}, [32, 16, 8, 4]),  # each merge takes every A token: halves
                           ({"first_layer": 1}, [32, 32, 24, 16]),  # 16 -> 12 -> 8 per view
                           ({"per_view": False, "keep_ratio": 0.25}, [32, 24, 16, 8])]:
        out = engine.query(MANAGER.create("tome", config), obs)
        assert out.record.visual_per_layer == visual, config
        assert out.record.tokens_per_layer == [n_other + v for v in visual]
        assert all(st.verb == "merge" for st in out.record.stages)
        assert out.record.llm_flops < out.record.dense_llm_flops


class Recording(ToMe):
    """ToMe that keeps every stage's assignment."""

    def __init__(self, config=None):
        super().__init__(config)
        self.assignments = []

    def assign(self, stage, keep, ctx, layout):
        assignment = super().assign(stage, keep, ctx, layout)
        self.assignments.append((keep.clone(), assignment))
        return assignment


def layer_io(model):
    """Hooks keeping every decoder layer's input and output hidden states (one query)."""
    seen = {"in": {}, "out": {}}
    handles = []

    def output(m, args, out, i):
        seen["out"][i] = (out[0] if isinstance(out, tuple) else out).clone()

    for index, layer in enumerate(model.llm.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, i=index: seen["in"].__setitem__(i, args[0].clone())))
        handles.append(layer.register_forward_hook(lambda m, args, out, i=index: output(m, args, out, i)))
    return seen, handles


def test_the_merge_is_the_size_weighted_mean_and_proportional_attention_weighs_it(tiny_model, obs):
    engine = PruningEngine(tiny_model)
    layout = tiny_model.encode(obs).layout
    first = layout.visual_start
    results = {}
    for proportional in (True, False):
        strategy = Recording({"r": 3, "proportional_attention": proportional})
        seen, handles = layer_io(tiny_model)
        try:
            actions = torch.as_tensor(engine.query(strategy, obs).actions)
        finally:
            for h in handles:
                h.remove()
        results[proportional] = (strategy, seen, actions)
        # follow every original visual token: its group (kept token) and the group's size
        group = torch.arange(layout.n_visual)
        for stage, (keep, a) in enumerate(strategy.assignments):
            out, nxt = seen["out"][stage][0], seen["in"][stage + 1][0]
            # visual rows of the layer's output by visual index, of the next layer's input in keep order
            present = torch.sort(torch.unique(group)).values
            rows = {int(v): out[first + i] for i, v in enumerate(present)}
            sizes = {int(v): int((group == v).sum()) for v in present}
            expected = {int(j): sizes[int(j)] * rows[int(j)] for j in keep}
            weight = {int(j): sizes[int(j)] for j in keep}
            for i, j in zip(a.removed.tolist(), a.into.tolist()):
                expected[j] = expected[j] + sizes[i] * rows[i]
                weight[j] += sizes[i]
            merged = torch.stack([expected[int(j)] / weight[int(j)] for j in keep])
            assert torch.allclose(nxt[first:first + keep.numel()], merged, atol=1e-5)
            for i, j in zip(a.removed.tolist(), a.into.tolist()):
                group[group == i] = j
            if stage > 0:  # tokens that already hold several originals take part: the weights are sizes
                assert any(sizes[i] > 1 for i in a.removed.tolist() + a.into.tolist())
    (_, with_pa, a_with), (_, without, a_without) = results[True], results[False]
    # before the first merge proportional attention adds log(1) = 0: layer 0 and the merge are the same
    assert torch.equal(with_pa["out"][0], without["out"][0])
    assert torch.equal(with_pa["in"][1], without["in"][1])
    # from then on tokens that hold several originals weigh more
    assert not torch.allclose(with_pa["out"][1], without["out"][1])
    assert not torch.allclose(a_with, a_without)


def test_proportional_attention_adds_log_size_to_the_merged_tokens_keys(tiny_model, obs, monkeypatch):
    import prunebench.engine.loop as loop

    biases = []
    run_layer = loop.run_layer
    monkeypatch.setattr(loop, "run_layer", lambda *args, bias=None, **kw: biases.append(bias) or run_layer(
        *args, bias=bias, **kw))
    strategy = Recording({"r": 3, "first_layer": 1, "last_layer": 1})
    PruningEngine(tiny_model).query(strategy, obs)
    assert biases[0] is None and biases[1] is None  # no merge before layer 2
    keep, a = strategy.assignments[0]
    sizes = torch.ones(tiny_model.encode(obs).layout.n_visual).index_add_(0, a.into, torch.ones(a.into.numel()))
    first = tiny_model.encode(obs).layout.visual_start
    for bias in biases[2:]:
        bias = bias.flatten()
        assert torch.allclose(bias[first:first + keep.numel()], sizes[keep].log())
        assert bias[:first].abs().sum() == 0 and bias[first + keep.numel():].abs().sum() == 0
    biases.clear()
    PruningEngine(tiny_model).query(Recording({"r": 3, "proportional_attention": False}), obs)
    assert all(b is None for b in biases)


def test_views_never_merge_with_each_other(tiny_model, obs):
    # (per_view=false pools them: see the hand-computed matching, where token 7 then merges into 0)
    view = tiny_model.encode(obs).layout.view_of_visual()
    per_view = Recording({"r": 100})
    PruningEngine(tiny_model).query(per_view, obs)
    assert len(per_view.assignments) == 3
    for _, a in per_view.assignments:
        assert torch.equal(view[a.removed], view[a.into])


@pytest.mark.parametrize("release_order", [False, True])
def test_later_merges_alternate_over_raster_or_the_releases_order(tiny_model, obs, monkeypatch, release_order):
    calls = []
    match = tome_module.bipartite_soft_matching
    monkeypatch.setattr(tome_module, "bipartite_soft_matching",
                        lambda keys, order, pool, r, release: calls.append(order.clone()) or match(
                            keys, order, pool, r, release))
    strategy = Recording({"release_order": release_order})
    PruningEngine(tiny_model).query(strategy, obs)
    assert len(calls) == 3
    for stage in range(1, 3):
        present = strategy.assignments[stage - 1][0]
        if not release_order:
            assert torch.equal(calls[stage], present)
        else:  # per view: the unmerged A tokens of the previous order (its 2nd, 4th, ...), then its B
            view = tiny_model.encode(obs).layout.view_of_visual()
            expected = []
            for v in (0, 1):
                previous = calls[stage - 1][view[calls[stage - 1]] == v]
                a, b = previous[1::2], previous[0::2]
                expected += [t for t in a.tolist() if t in present.tolist()] + b.tolist()
            assert calls[stage].tolist() == expected
            assert not torch.equal(calls[stage], present)
    # the matching runs once per stage although score, select and assign all read it
    PruningEngine(tiny_model).query(ToMe({"release_order": release_order}), obs)
    assert len(calls) == 6


def test_the_shipped_policy_merges_as_configured():
    from prunebench.models import load_model

    model, _ = load_model()
    engine = PruningEngine(model)
    obs = make_observation(size=224)
    out = engine.query(MANAGER.create("tome"), obs)
    layout = model.encode(obs).layout
    assert layout.n_visual == 128 and model.n_layers == 4
    assert out.record.visual_per_layer == [128, 106, 86, 64]  # 64 -> 32 per view: 11, 10, 11
    assert [st.where for st in out.record.stages] == ["after_layer_0", "after_layer_1", "after_layer_2"]
    assert np.isfinite(out.actions).all()
    dense = engine.query(MANAGER.create("none"), obs)
    assert not np.array_equal(out.actions, dense.actions)
    assert np.array_equal(engine.query(MANAGER.create("tome", {"r": 0}), obs).actions, dense.actions)


def test_registered_and_search_space():
    from prunebench.study.space import SearchTrial, parameters

    assert "tome" in MANAGER.builtin_strategies() and MANAGER.get("tome") is ToMe
    trial = optuna.trial.FixedTrial({"keep_ratio": 0.3, "first_layer": 1, "inflect": -1.0,
                                     "proportional_attention": False})
    config = ToMeConfig.search_space(SearchTrial(trial, {}, {}, n_layers=4))
    assert config == ToMeConfig(keep_ratio=0.3, first_layer=1, inflect=-1.0, proportional_attention=False)
    space = parameters("tome", 32)
    assert space["keep_ratio"] == ("float", [0.1, 1.0])
    assert space["first_layer"] == ("int", [0, 16])
    assert TINY.n_layers == 4
