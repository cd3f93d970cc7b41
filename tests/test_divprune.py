"""DivPrune on hand-computed inputs, against a reference of the release's greedy loop, and end to end."""

import math

import numpy as np
import optuna
import pytest
import torch

from prunebench import BEFORE_LLM, EMBEDDINGS, Budget, Observation, QueryContext, TokenLayout
from prunebench.engine.signals import visual_embeddings
from prunebench.plugins.manager import MANAGER
from prunebench.strategies.divprune import DivPrune, DivPruneConfig


def two_views(rows=2, cols=2):
    return TokenLayout.build([("a", rows, cols), ("b", rows, cols)], 1, 4, 1, 1, 2)


def at(degrees, norm=1.0):
    """A 2-D feature at an angle: the cosine distance of two of them is 1 - cos(angle between)."""
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


def kept(features, layout, **config):
    """What DivPrune's schedule -> score -> select keeps on ``features`` (one row per visual token)."""
    s = MANAGER.create("divprune", config)
    ctx = QueryContext(observation=Observation({}, np.zeros(8, np.float32), ""), layout=layout, n_layers=4)
    ctx.signals[EMBEDDINGS] = torch.as_tensor(features, dtype=torch.float32)
    stage = s.schedule(ctx).stages[0]
    return s.select(stage, s.score(stage, ctx.signals, ctx), ctx, layout).tolist()


def release_greedy(features, k):
    """The release's loop, as read in vbdi/divprune@799e2d9 (llava_arch.py, ``DivPrune``): first the
    token whose second smallest column entry (nearest other token) is largest, then the token whose
    minimum distance to the picked ones is largest; picked tokens are not masked."""
    f = features / features.norm(dim=1, keepdim=True)
    d = 1.0 - f @ f.T
    picks = [int(torch.topk(d, 2, dim=0, largest=False).values[1].argmax())]
    while len(picks) < k:
        picks.append(int(d[picks].min(dim=0).values.argmax()))
    return sorted(picks)


# Per view, by hand (angles in degrees; the norms differ, which the cosine ignores):
#  view a  0, 30, 100, 200: nearest neighbours 30, 30, 70, 100 -> first 200 (token 3); then the min
#          distances to {200} are 160, 170, 100 -> 30 (token 1); then min to {200, 30}: 30, 70 ->
#          100 (token 2).
#  view b  90, 95, 250, 0: nearest 5, 5, 110, 90 -> first 250 (token 6); to {250}: 160, 155, 110 ->
#          90 (token 4); to {250, 90}: 5, 90 -> 0 (token 7).
HAND = [at(0), at(30, 3.0), at(100, 0.5), at(200, 2.0), at(90), at(95, 4.0), at(250), at(0, 0.1)]


@pytest.mark.parametrize("keep_ratio, expected", [
    (0.25, [3, 6]),  # one per view: the most isolated token of each
    (0.5, [1, 3, 4, 6]),
    (0.75, [1, 2, 3, 4, 6, 7]),
])
def test_greedy_max_min_picks_by_hand(keep_ratio, expected):
    assert kept(HAND, two_views(), keep_ratio=keep_ratio) == expected


def test_the_first_pick_is_the_most_isolated_token_not_the_first_index():
    # starting from token 0 (0 deg), farthest-point would add 200 then 100: {0, 2, 3}, not {1, 2, 3}
    assert kept(HAND, two_views(), keep_ratio=0.75)[:3] == [1, 2, 3]
    assert release_greedy(torch.tensor(HAND[:4]), 3) == [1, 2, 3]


def test_one_pool_can_spend_the_budget_on_one_camera():
    # view a 0, 2, 5, 9 (near-duplicates), view b 90, 180, 270, 135
    features = [at(0), at(2), at(5), at(9), at(90), at(180), at(270), at(135)]
    # per view: a's most isolated is 9 (nearest 4 deg; token 3), b's is 270 (nearest 90; token 6)
    assert kept(features, two_views(), keep_ratio=0.25) == [3, 6]
    # one pool: 270 first (nearest 90 deg, the others <= 45), then 90 (180 deg from it; token 4)
    assert kept(features, two_views(), keep_ratio=0.25, per_view=False) == [4, 6]


def test_equals_the_release_greedy_loop_on_random_features():
    lay = two_views(4, 4)
    gen = torch.Generator().manual_seed(0)
    for keep_ratio in (0.098, 0.2, 0.3, 0.5, 0.8):
        features = torch.randn(lay.n_visual, 8, generator=gen) * torch.rand(lay.n_visual, 1, generator=gen)
        k = max(1, round(keep_ratio * lay.n_visual))
        assert kept(features, lay, keep_ratio=keep_ratio, per_view=False) == release_greedy(features, k)
        q = Budget(keep_ratio=keep_ratio).quotas(lay)  # per view: the release's loop on each camera
        expected = release_greedy(features[:16], q[0]) + [16 + i for i in release_greedy(features[16:], q[1])]
        assert kept(features, lay, keep_ratio=keep_ratio) == expected


@pytest.mark.parametrize("keep_ratio, per_view, counts", [
    (0.098, True, [7, 6]),   # round(0.098 x 128) = 13, split 6.5 / 6.5 -> largest remainder 7 / 6
    (0.25, True, [16, 16]),
    (0.5, True, [32, 32]),
    (0.01, True, [1, 0]),    # round(1.28) = 1: at least one token
    (0.098, False, [13]),    # one pool: round(0.098 x 128) tokens, wherever they are
])
def test_kept_count_equals_the_budget(keep_ratio, per_view, counts):
    lay = two_views(8, 8)  # the built-in model's 2 x 64 tokens
    features = torch.randn(lay.n_visual, 16, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor(kept(features, lay, keep_ratio=keep_ratio, per_view=per_view))
    assert keep.unique().numel() == keep.numel() == sum(counts)
    if per_view:
        assert [int((keep < 64).sum()), int((keep >= 64).sum())] == counts


def test_defaults_and_registration():
    c = DivPruneConfig()
    assert (c.keep_ratio, c.after_layer, c.per_view) == (0.098, BEFORE_LLM, True)
    assert MANAGER.get("divprune") is DivPrune
    assert MANAGER.strategies()["divprune"].plugin == "prunebench.strategies.divprune"
    assert "divprune" in MANAGER.builtin_strategies()
    # the release's renumbering (LLaVA's generate) only behind its flag
    assert MANAGER.create("divprune").position_ids == "original"
    assert MANAGER.create("divprune", {"release_positions": True}).position_ids == "recompact"


def test_plugins_command_lists_it(capsys):
    from prunebench.cli.main import main

    assert main(["plugins"]) == 0
    assert "strategy divprune: positions=original" in capsys.readouterr().out


def test_end_to_end_before_the_llm_on_the_input_embeddings(engine, obs):
    out = engine.query(MANAGER.create("divprune"), obs)
    keep = out.kept["before_llm"]
    # 2 views x 16 tokens: round(0.098 x 32) = 3 kept, split 2 / 1 (largest remainder)
    assert int((keep < 16).sum()) == 2 and int((keep >= 16).sum()) == 1
    stage = out.record.stages[0]
    assert stage.where == "before_llm" and (stage.visual_before, stage.visual_after) == (32, 3)
    dense = engine.query(MANAGER.create("none"), obs).record.tokens_per_layer
    assert out.record.tokens_per_layer == [n - 29 for n in dense]
    # the features are the LLM input embeddings of the visual tokens, picked by the release's loop
    enc = engine.model.encode(obs)
    features = visual_embeddings(enc.embeds, enc.layout).float()
    expected = release_greedy(features[:16], 2) + [16 + i for i in release_greedy(features[16:], 1)]
    assert keep.tolist() == expected


def test_a_later_removal_point_still_uses_the_input_embeddings(engine, obs):
    before = engine.query(MANAGER.create("divprune", {"keep_ratio": 0.25}), obs)
    after = engine.query(MANAGER.create("divprune", {"keep_ratio": 0.25, "after_layer": 1}), obs)
    assert after.kept["after_layer_1"].tolist() == before.kept["before_llm"].tolist()
    assert after.record.tokens_per_layer[:2] == engine.query(MANAGER.create("none"), obs).record.tokens_per_layer[:2]
    assert after.record.stages[0].visual_after == 8


def test_search_space():
    from prunebench.study.space import SearchTrial, parameters

    trial = optuna.trial.FixedTrial({"keep_ratio": 0.2, "after_layer": 1, "per_view": False})
    config = DivPruneConfig.search_space(SearchTrial(trial, {}, {}, n_layers=4))
    assert config == DivPruneConfig(keep_ratio=0.2, after_layer=1, per_view=False)
    space = parameters("divprune", 32)
    assert space["keep_ratio"] == ("float", [0.05, 1.0])  # holds the release's 0.098
    assert space["after_layer"] == ("int", [BEFORE_LLM, 16])
    assert space["per_view"] == ("categorical", [True, False])
