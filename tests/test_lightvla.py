"""LightVLA's parameter-free selector (``lightvla-free``): hand-computed picks, and end to end."""

import math

import numpy as np
import optuna
import pytest
import torch

from prunebench import EMBEDDINGS, Observation, QueryContext, TokenLayout, row_embeddings
from prunebench.engine.loop import PruningEngine
from prunebench.engine.signals import row_embeddings as input_rows
from prunebench.engine.signals import visual_embeddings
from prunebench.plugins.manager import MANAGER
from prunebench.strategies.lightvla_free import LightVLAFree, LightVLAFreeConfig, lightvla_picks
from tests.conftest import make_observation


def at(degrees, norm=1.0):
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


def two_views(cols=3):
    return TokenLayout.build([("a", 1, cols), ("b", 1, cols)], 1, 4, 1, 1, 2)


def run(patches, task, layout, **config):
    """What the strategy's schedule -> score -> select keeps, and its scores (picks per token)."""
    s = MANAGER.create("lightvla-free", config)
    ctx = QueryContext(observation=Observation({}, np.zeros(8, np.float32), ""), layout=layout, n_layers=4)
    ctx.signals[EMBEDDINGS] = torch.tensor(patches, dtype=torch.float32)
    ctx.signals[row_embeddings(s.config.task_rows)] = torch.tensor(task, dtype=torch.float32)
    stage = s.schedule(ctx).stages[0]
    scores = s.score(stage, ctx.signals, ctx)
    return s.select(stage, scores, ctx, layout).tolist(), scores.tolist()


# In 2-D, RMS normalisation leaves only a vector's direction (every row gets norm sqrt 2), so the
# attention logit of a patch and a task token is sqrt(2) cos(angle between them) and a query picks
# the patch closest in angle to it. The patch at 0 deg has norm 5: without the RMS norm of the
# patches it would win every pick (a raw dot product favours long vectors).
PATCHES = [at(0, 5.0), at(20), at(45), at(70), at(90), at(135)]  # view a: 0-2, view b: 3-5


def test_one_task_token_every_query_picks_the_same_patch():
    # one key: softmax weight 1, every query is the task token (30 deg): the closest patch is 20 deg
    keep, votes = run(PATCHES, [at(30, 0.2)], two_views())
    assert keep == [1] and votes == [0, 6, 0, 0, 0, 0]
    # within each query's own camera: view a's 20 deg, view b's 70 deg (the nearest there)
    keep, votes = run(PATCHES, [at(30, 0.2)], two_views(), per_view=True)
    assert keep == [1, 3] and votes == [0, 3, 0, 3, 0, 0]


def test_two_task_tokens_the_union_of_the_picks_by_hand():
    # task tokens at 0 and 90 deg: a patch at angle p weighs them by softmax(sqrt2 cos p, sqrt2 sin p),
    # so its query lies at atan(exp(sqrt2 (sin p - cos p))):
    #   0 -> 13.7 (nearest patch 20), 20 -> 23.2 (20), 45 -> 45 (45), 70 -> 66.8 (70),
    #   90 -> 76.3 (70), 135 -> 82.3 (90)
    task = [at(0, 3.0), at(90, 0.5)]
    keep, votes = run(PATCHES, task, two_views())
    assert keep == [1, 2, 3, 4] and votes == [0, 2, 1, 2, 1, 0]
    assert lightvla_picks(torch.tensor(PATCHES), torch.tensor(task)).tolist() == [1, 1, 2, 3, 3, 4]
    # the kept count depends on the input: 1 token with one task token, 4 with these two
    assert len(run(PATCHES, [at(30)], two_views())[0]) == 1


def test_the_cap_keeps_the_most_picked_tokens():
    task = [at(0), at(90)]
    assert run(PATCHES, task, two_views(), max_keep_ratio=1 / 3)[0] == [1, 3]  # 2 votes each
    assert run(PATCHES, task, two_views(), max_keep_ratio=0.5)[0] == [1, 2, 3]  # tie 2 / 4: lower index
    assert run(PATCHES, task, two_views(), max_keep_ratio=1.0)[0] == [1, 2, 3, 4]  # never binds
    # per camera: one each (round(6/3) = 2, split 1 / 1)
    assert run(PATCHES, task, two_views(), max_keep_ratio=1 / 3, per_view=True)[0] == [1, 3]


def reference(patches, task):
    """The selector as the release computes it, written out with an explicit softmax."""
    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    d = patches.shape[-1]
    p, t = rms(patches.double()), rms(task.double())
    q = rms(torch.softmax(p @ t.T / math.sqrt(d), dim=-1) @ t)
    return sorted(set((q @ p.T / math.sqrt(d)).argmax(dim=-1).tolist()))


def test_equals_the_written_out_selector_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    lay = TokenLayout.build([("a", 4, 4), ("b", 4, 4)], 1, 4, 1, 1, 2)
    sizes = set()
    for _ in range(20):
        patches = torch.randn(32, 16, generator=gen) * torch.rand(32, 1, generator=gen) * 4
        task = torch.randn(9, 16, generator=gen) * torch.rand(9, 1, generator=gen) * 4
        keep, _ = run(patches.tolist(), task.tolist(), lay)
        assert keep == reference(patches, task)
        sizes.add(len(keep))
    assert len(sizes) > 1  # data-dependent count


def test_defaults_and_registration():
    c = LightVLAFreeConfig()
    assert (c.task_rows, c.per_view, c.max_keep_ratio, c.dtype) == ("post_visual", False, None, "float32")
    assert MANAGER.get("lightvla-free") is LightVLAFree
    assert MANAGER.strategies()["lightvla-free"].plugin == "prunebench.strategies.lightvla_free"
    assert "lightvla-free" in MANAGER.builtin_strategies()
    assert LightVLAFree.position_ids == "original"  # the release keeps the kept tokens' position ids
    with pytest.raises(ValueError):
        LightVLAFreeConfig(task_rows="action")


def test_plugins_command_lists_it(capsys):
    from prunebench.cli.main import main

    assert main(["plugins"]) == 0
    assert "strategy lightvla-free: positions=original" in capsys.readouterr().out


def check_end_to_end(model, obs, config=None):
    engine = PruningEngine(model, record_kept=True)
    s = MANAGER.create("lightvla-free", config)
    out = engine.query(s, obs)
    keep = out.kept["before_llm"]
    enc = model.encode(obs)
    n = enc.layout.n_visual
    assert 1 <= keep.numel() <= n
    stage = out.record.stages[0]
    assert stage.where == "before_llm" and (stage.visual_before, stage.visual_after) == (n, keep.numel())
    dense = engine.query(MANAGER.create("none"), obs).record.tokens_per_layer
    assert out.record.tokens_per_layer == [t - (n - keep.numel()) for t in dense]
    # the kept set is the union of the picks on the model's own input embeddings
    view_of = enc.layout.view_of_visual() if s.config.per_view else None
    picks = lightvla_picks(visual_embeddings(enc.embeds, enc.layout).float(),
                           input_rows(enc.embeds, enc.layout, s.config.task_rows).float(), view_of)
    assert keep.tolist() == sorted(set(picks.tolist()))
    return keep


@pytest.mark.parametrize("config", [None, {"per_view": True}, {"task_rows": "prompt"}])
def test_end_to_end_on_the_tiny_model(tiny_model, obs, config):
    check_end_to_end(tiny_model, obs, config)


def test_end_to_end_on_the_shipped_policy():
    from prunebench.models import load_model

    model, _ = load_model()
    for seed in range(3):
        keep = check_end_to_end(model, make_observation(seed, size=128))
        assert keep.numel() < 128  # an untrained-for selector: every query picks among few tokens


def test_the_task_span_is_the_releases_on_openvla_oft():
    """On the OFT adapter, ``post_visual`` is what the release splits off after the patches:
    proprio first, the prompt, the 56 zeroed action slots, STOP."""
    from prunebench.models.oft_tiny import build_tiny_oft

    model = build_tiny_oft(seed=0)
    rng = np.random.default_rng(1)
    images = {v: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for v in ("agentview", "wrist")}
    obs = Observation(images, rng.normal(size=8).astype(np.float32), "pick up the ketchup")
    enc = model.encode(obs)
    lay = enc.layout
    task = input_rows(enc.embeds, lay, "post_visual")
    assert task.shape[0] == lay.length - 1 - lay.n_visual  # everything but BOS and the patches
    assert torch.equal(task[0], enc.embeds[0, lay.proprio[0]])  # proprio is a task token, not a patch
    a = lay.actions[0] - lay.proprio[0]
    assert not task[a:a + lay.n_actions].any() and task[-1].any()  # zeroed action slots, then STOP
    check_end_to_end(model, obs)


def test_bfloat16_repeats_the_rounding_and_mostly_agrees():
    gen = torch.Generator().manual_seed(1)
    patches, task = torch.randn(64, 32, generator=gen), torch.randn(12, 32, generator=gen)
    full = set(lightvla_picks(patches, task).tolist())
    half = set(lightvla_picks(patches, task, dtype=torch.bfloat16).tolist())
    assert full & half
    lay = TokenLayout.build([("a", 4, 8), ("b", 4, 8)], 1, 4, 1, 1, 2)
    assert run(patches.tolist(), task.tolist(), lay, dtype="bfloat16")[0] == sorted(half)


def test_search_space():
    from prunebench.study.space import SearchTrial, parameters

    trial = optuna.trial.FixedTrial({"task_rows": "text", "per_view": True, "max_keep_ratio": 0.3})
    config = LightVLAFreeConfig.search_space(SearchTrial(trial, {}, {}, n_layers=4))
    assert config == LightVLAFreeConfig(task_rows="text", per_view=True, max_keep_ratio=0.3)
    space = parameters("lightvla-free", 32)
    assert space["task_rows"] == ("categorical", ["post_visual", "prompt", "text", "language", "nonvision"])
    assert space["per_view"] == ("categorical", [False, True])
    assert space["max_keep_ratio"] == ("float", [0.05, 1.0])  # 1.0 never binds: the release
