"""SpecPrune-VLA, VLA-Pruner and ADP on hand-computed inputs."""

import numpy as np
import pytest
import torch

from prunebench import PIXELS, EnvStep, Observation, PrunePlan, Strategy
from prunebench.engine.loop import PruningEngine
from prunebench.models import load_model
from prunebench.plugins.manager import MANAGER
from prunebench.strategies.adp import DENSE, PRUNED, ADPConfig, TrajectoryGate, displacement
from prunebench.strategies.specprune_vla import lookback
from prunebench.strategies.vla_pruner import smooth
from tests.conftest import make_observation


def context(engine, obs, frames=(), **kw):
    return engine.context(obs, frames=list(frames), **kw)


def step(action, left=3, index=0):
    return EnvStep(step_index=index, action=np.asarray(action, float), eef_pos=np.zeros(3),
                   actions_left_in_chunk=left)


# ----------------------------------------------------------------------------- SpecPrune-VLA
@pytest.mark.parametrize("move, T", [(0, 6), (4, 6), (5, 5), (7, 4), (8, 3), (10, 2), (12, 2)])
def test_specprune_lookback_formula(move, T):
    assert lookback(move) == T


def test_specprune_lookback_without_the_clamp_is_the_release_formula():
    assert lookback(12, t_min=-10) == 0  # the release would index the frame buffer from its start


def test_specprune_controller_switching_and_requery():
    s = MANAGER.create("specprune-vla")
    slow, fast = [0.1, 0.1, 0.1, 0, 0, 0, 1], [0.5, 0.5, 0.0, 0, 0, 0, 1]
    for _ in range(9):  # before the controller starts: ignored
        assert s.on_env_step(step(slow)) is False
    assert s.on_env_step(step(slow)) is False and not s.precise  # 10th action: accumulates only
    assert np.allclose(s.motion[:3], [0.1, 0.1, 0.1])
    assert s.on_env_step(step(slow, left=3)) is True and s.precise  # coarse -> fine mid-chunk: re-query
    assert s.on_env_step(step([0, 0, 0.3, 0, 0, 0, 1])) is False and not s.precise  # a_z > 0.2: exit
    assert s.on_env_step(step(fast, left=0)) is False and not s.precise  # fast stays coarse
    assert s.on_env_step(step(slow, left=0)) is False and s.precise  # fine at a chunk's end: no re-query
    # precise mode leaves on a rotation only when the chunk is exhausted
    assert s.on_env_step(step([0, 0, 0, 0.4, 0, 0, 1], left=2)) is False and s.precise
    assert s.on_env_step(step([0, 0, 0, 0.4, 0, 0, 1], left=0)) is False and not s.precise


def test_specprune_static_set_from_frame_difference(engine):
    obs = make_observation(1)
    old = {v: img.copy() for v, img in obs.images.items()}
    old["agentview"][0:8, 0:8] = 255 - old["agentview"][0:8, 0:8]  # patch 0 of the primary view moved
    same = {v: img.copy() for v, img in obs.images.items()}
    frames = [old] + [same] * 4  # no motion -> T = 6 -> compare with the frame 5 steps back
    s = MANAGER.create("specprune-vla")
    s.schedule(context(engine, obs, frames))
    # 4x4 = 16 patches per view; at most int(200/256 * 16) = 12 static (most similar first), so
    # 4 dynamic per view, patch 0 of the primary view among them
    assert s.lookback_used == 6
    dynamic = s.dynamic_tokens
    assert 0 in dynamic and (dynamic < 16).sum() == 4 and (dynamic >= 16).sum() == 4
    s = MANAGER.create("specprune-vla", {"static_max_removed": 1.0})
    s.schedule(context(engine, obs, frames))
    assert s.dynamic_tokens.tolist() == [0]  # only the changed patch


def test_specprune_keeps_dynamic_tokens_through_every_stage(engine):
    obs = make_observation(2)
    frames = [make_observation(3).images] * 5  # everything changed: all patches dynamic
    s = MANAGER.create("specprune-vla", {"dynamic": False})
    result = engine.query(s, obs, frames=frames)
    assert [r.visual_after for r in result.record.stages] == [32, 32]
    s = MANAGER.create("specprune-vla", {"dynamic": False})
    result = engine.query(s, obs, frames=[obs.images] * 5)  # nothing changed: 12 of 16 static per view
    static0, static1 = result.record.stages
    dyn = set(s.dynamic_tokens.tolist())
    assert dyn <= set(result.kept["after_layer_0"].tolist()) and dyn <= set(result.kept["after_layer_1"].tolist())
    # k = round(16/256 * 16) = 1 per view: layer 0 keeps the 4 dynamic + the top 3 per view (which
    # may overlap), layer 1 the dynamic + its top 1 + the layer-0 best (may overlap)
    assert 2 * 4 <= static1.visual_after <= static0.visual_after <= 2 * (4 + 3)
    assert static1.visual_after <= 2 * (4 + 2)


def test_specprune_without_an_earlier_frame_keeps_every_visual_token_on_the_shipped_policy():
    model, _ = load_model()
    engine = PruningEngine(model, record_kept=True)
    obs = make_observation(5, size=128)  # LIBERO's camera size; the policy resizes to 96 px
    s = MANAGER.create("specprune-vla")
    n = engine.model.encode(obs).layout.n_visual
    first = engine.query(s, obs)  # an episode's first query: no earlier frame, so no static patch
    assert s.dynamic_tokens.tolist() == list(range(n))
    assert "after_layer_0" not in first.kept and "after_layer_1" not in first.kept
    assert first.record.visual_per_layer[:3] == [n, n, n]  # layers 0-2 see every visual token
    assert first.record.visual_per_layer[3] < n  # the dynamic stage after layer 2 still prunes
    # a real earlier frame (this one moved everywhere but in the view's top rows): static stages run
    earlier = {v: img.copy() for v, img in obs.images.items()}
    for v in earlier:
        earlier[v][32:] = np.roll(earlier[v][32:], 7, axis=1)
    second = engine.query(s, obs, query_index=1, frames=[earlier])
    kept0 = second.kept["after_layer_0"]
    assert 0 < kept0.numel() < n and set(s.dynamic_tokens.tolist()) <= set(kept0.tolist())


def test_specprune_frame_difference_is_on_the_models_grid_after_its_crop():
    from prunebench.models.oft_tiny import build_tiny_oft

    engine = PruningEngine(build_tiny_oft(seed=0))
    rng = np.random.default_rng(2)
    images = {v: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for v in ("agentview", "wrist")}
    obs = Observation(images, np.zeros(8, np.float32), "pick up the ketchup")
    outside = {v: img.copy() for v, img in images.items()}
    outside["agentview"][:5] = 255 - outside["agentview"][:5]  # rows 0-4: outside OFT's centre crop
    inside = {v: img.copy() for v, img in images.items()}
    inside["agentview"][100:110, 100:110] = 255 - inside["agentview"][100:110, 100:110]
    config = {"static_max_removed": 1.0}
    s = MANAGER.create("specprune-vla", config)
    s.schedule(context(engine, obs, [outside]))
    assert s.dynamic_tokens.numel() == 0  # the cropped-away rows change no patch the model sees
    s = MANAGER.create("specprune-vla", config)
    s.schedule(context(engine, obs, [inside]))
    changed = s.dynamic_tokens.tolist()
    assert changed and all(t < 256 for t in changed)  # 16x16 patches of 14 px: only the primary view


def test_patch_pixels_of_a_frame_follow_the_models_preprocessing(engine):
    obs, other = make_observation(6, size=48), make_observation(7, size=48)  # MiniOFT resizes to 32

    class Probe(Strategy):
        name = "pixels-probe"

        def schedule(self, ctx):
            self.ctx = ctx
            return PrunePlan.dense((PIXELS,))

        def on_forward_end(self, signals, record):
            self.pixels = signals[PIXELS]

    probe = Probe()
    engine.query(probe, obs, frames=[other.images])
    model = engine.model
    assert torch.equal(probe.pixels, model.patch_pixels(model.preprocess_images(obs)))
    assert probe.ctx.patch_pixels(obs.images) is probe.pixels  # the current frame: no second pass
    assert torch.equal(probe.ctx.patch_pixels(other.images),
                       model.patch_pixels(model.preprocess_images(other)))
    assert probe.pixels.shape == (32, 8 * 8 * 3)  # (n_visual, patch * patch * 3), 4x4 patches per view


def test_specprune_layer1_index_bug_flag(engine):
    from prunebench.contract.layout import TokenLayout

    obs = make_observation(0)
    layout: TokenLayout = engine.model.encode(obs).layout
    layout.keep_slots(torch.sort(torch.cat([torch.nonzero(~layout.is_visual_slot(), as_tuple=True)[0],
                                            layout.visual_to_slots(torch.tensor([0, 2, 5, 7, 16, 20]))])).values)
    scores = torch.full((32,), float("nan"))
    scores[[0, 2, 5, 7]] = torch.tensor([0.1, 0.2, 0.9, 0.3])
    fixed = MANAGER.create("specprune-vla")
    buggy = MANAGER.create("specprune-vla", {"release_layer1_index_bug": True})
    fixed.k = buggy.k = [1, 0]  # the top 1 of view 0
    assert fixed._top1(scores, layout).tolist() == [5]
    assert buggy._top1(scores, layout).tolist() == [2]  # local index 2 read as patch 2
    fixed.k = buggy.k = [1, 1]  # view 1 holds 16 and 20 (unscored): 16 is its local index 0
    assert fixed._top1(scores, layout).tolist() == [5, 16]
    assert buggy._top1(scores, layout).tolist() == [2, 16]


def test_specprune_dynamic_stage_keeps_a_share_of_the_sequence_with_a_floor(engine):
    obs = make_observation(4)
    s = MANAGER.create("specprune-vla", {"static": False, "dynamic_layers": (1, 2),
                                         "importance_layers": (0, 1)})
    result = engine.query(s, obs)
    first, second = result.record.stages
    n_other = result.record.tokens_per_layer[0] - 32
    assert first.visual_after == int(0.8 * (n_other + 32)) - n_other
    assert second.visual_after == max(int(0.8 * (n_other + first.visual_after)) - n_other,
                                      int(60 / 512 * 32))


# ----------------------------------------------------------------------------- VLA-Pruner
def test_vla_pruner_smoothing_weights_the_newest_most():
    old, mid, new = torch.tensor([1.0, 0]), torch.tensor([0.0, 1]), torch.tensor([0.0, 0])
    w = torch.tensor([0.64, 0.8, 1.0])
    expected = (w[0] * old + w[1] * mid + w[2] * new) / w.sum()
    assert torch.allclose(smooth([old, mid, new], 0.8), expected)
    reversed_ = (w[2] * old + w[1] * mid + w[0] * new) / w.sum()
    assert torch.allclose(smooth([old, mid, new], 0.8, oldest_first=True), reversed_)


def test_vla_pruner_dense_warm_up_then_per_view_budget(engine):
    s = MANAGER.create("vla-pruner", {"keep_ratio": 0.25})
    s.on_episode_start(None)
    records = [engine.query(s, make_observation(i), query_index=i).record for i in range(4)]
    assert [r.dense for r in records] == [True, True, True, False]
    assert len(s.history) == 3 and s.history[-1].shape == (32,)
    stage = records[3].stages[0]
    assert stage.where == f"after_layer_{s._layers(4)[0]}" and stage.visual_after == 8  # 4 per view of 16


def test_vla_pruner_union_then_diversity_per_view(engine):
    s = MANAGER.create("vla-pruner", {"keep_ratio": 0.25, "window": 1})
    s.on_episode_start(None)
    engine.query(s, make_observation(0))
    result = engine.query(s, make_observation(1))
    kept = result.kept[f"after_layer_{s._layers(4)[0]}"]
    assert (kept < 16).sum() == 4 and (kept >= 16).sum() == 4


def test_depth_scaling_of_layer_defaults():
    vp = MANAGER.create("vla-pruner")
    assert vp._layers(32) == (3, 15) and vp._layers(8) == (1, 4)
    sp = MANAGER.create("specprune-vla")
    assert sp._layers(32)[1] == (5, 10, 15, 20) and sp._layers(8)[1] == (2, 3, 4, 5)
    assert sp._layers(32)[2] == (0, 1, 12) and sp._layers(8)[2] == (0, 1, 3)
    assert MANAGER.create("vla-pruner", {"prune_layer": 2})._layers(8)[0] == 2  # overridable


# ----------------------------------------------------------------------------- ADP
def test_adp_gate_decisions_for_a_displacement_trace():
    gate = TrajectoryGate(ADPConfig())
    trace = [0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.05, 0.3]
    states = [gate.update(d) for d in trace]
    # first 3 windows dense ... d >= max(prev two) prunes, at most 3 in a row, d < min(prev) dense,
    # in between prunes
    assert states == [DENSE, DENSE, PRUNED, PRUNED, PRUNED, DENSE, DENSE, PRUNED]


def test_adp_gate_without_the_streak_limit():
    gate = TrajectoryGate(ADPConfig(max_consecutive_pruned=0))
    assert [gate.update(d) for d in [0.1, 0.2, 0.3, 0.35, 0.4, 0.5]][-1] == PRUNED


def test_adp_displacement():
    poses = [np.zeros(3), np.array([0.3, 0, 0]), np.array([0.3, 0.4, 0])]
    assert displacement(poses, "net") == pytest.approx(0.5)
    assert displacement(poses, "arc") == pytest.approx(0.7)


def test_adp_budget_split_and_recompacted_positions(engine):
    s = MANAGER.create("adp", {"gate": False})
    result = engine.query(s, make_observation(5))
    kept = result.kept["before_llm"]
    # round(0.3 * 32) = 10 kept, split 0.4 / 0.6 -> 4 primary, 6 wrist
    assert (kept < 16).sum() == 4 and (kept >= 16).sum() == 6
    assert s.position_ids == "recompact"


def test_adp_first_three_chunks_dense_in_a_stream(engine):
    from prunebench.evaluation.runner import run_stream
    from prunebench.evaluation.streams import SyntheticStream

    s = MANAGER.create("adp")
    results = run_stream(engine, s, SyntheticStream(n_queries=6, image_size=32))
    assert [r.record.dense for r in results][:3] == [True, True, True]
    assert len(s.gate.displacements) == 5  # one per executed chunk before a query
