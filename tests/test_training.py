"""Training the built-in policy: normalisation rules, data loading, reproducibility (no simulator)."""

import numpy as np
import pytest
import torch

from prunebench.models import load_model
from prunebench.training.train import (
    Samples,
    TrainConfig,
    augment,
    batches,
    bounds,
    load_samples,
    switch_weights,
    train,
)
from tests.conftest import TINY

INSTRUCTIONS = ["pick up the ketchup and place it in the basket",
                "pick up the alphabet soup and place it in the basket"]


def write_demo(path, seed: int, steps: int = 24, render_every: int = 3, size: int = 32) -> None:
    """A demo file shaped like prunebench.training.demos writes: rotation constant, gripper +-1. Each task
    has its own scene (dark or bright) and instruction, and its own motion."""
    rng = np.random.default_rng(seed)
    task = seed % 2
    actions = np.zeros((steps, 7), np.float32)
    # the motion depends on the task, so a trained policy must read its inputs
    actions[:, :3] = (1 if task else -1) * np.array([0.8, -0.5, 0.3]) + 0.05 * rng.normal(size=(steps, 3))
    actions[:, 6] = 1 if task else -1
    proprio = 0.1 * rng.normal(size=(steps, 8)).astype(np.float32)
    proprio[:, 3] = 3.14 + 1e-4 * rng.normal(size=steps)  # near-constant axis-angle
    frame_steps = np.arange(0, steps, render_every, dtype=np.int32)
    scene = 40 + 170 * task
    noise = rng.integers(-30, 31, (len(frame_steps), 2, size, size, 3))
    images = np.clip(scene + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, frame_steps=frame_steps, proprio=proprio, actions=actions,
                        executed=actions, instruction=np.asarray(INSTRUCTIONS[task]),
                        task_id=np.asarray(task), seed=np.asarray(seed), noise=np.asarray(0.0))


def tiny_config(tmp_path, **fields) -> TrainConfig:
    for seed in range(6):
        write_demo(tmp_path / "demos" / f"task{seed % 2:02d}" / f"seed{seed:07d}.npz", seed)
    base = dict(data=str(tmp_path / "demos"), model=TINY.model_dump(), steps=6, batch_size=4,
                eval_every=3, val_fraction=0.2, warmup=2, threads=1)
    return TrainConfig(**{**base, **fields})


def test_bounds_make_constant_and_tiny_span_dimensions_neutral():
    values = np.stack([np.linspace(-1, 1, 200), np.zeros(200), 3.14 + np.linspace(0, 1e-4, 200)], 1)
    q01, q99 = bounds(values, neutral_span=1e-3)
    assert q01[0] < -0.9 and q99[0] > 0.9
    assert q01[1] == q99[1] == 0
    assert q01[2] == q99[2] and abs(float(q01[2]) - 3.14) < 1e-3


def test_chunks_are_the_next_eight_intended_actions_padded_with_the_last(tmp_path):
    cfg = tiny_config(tmp_path)
    from prunebench.models.mini_oft import MiniOFT

    path = tmp_path / "big" / "task00" / "seed0000000.npz"
    write_demo(path, 0, size=40)
    samples = load_samples([path], MiniOFT.random(TINY))  # resized 40 -> 32 px once, at load
    demo = np.load(path)
    assert samples.images.shape == (8, 2, 3, 32, 32) and samples.images.dtype == torch.uint8
    np.testing.assert_array_equal(samples.chunks[0], demo["actions"][0:8])
    last = samples.chunks[-1]  # frame at step 21: actions 21, 22, 23, then 23 repeated
    np.testing.assert_array_equal(last[:3], demo["actions"][21:24])
    np.testing.assert_array_equal(last[3:], np.repeat(demo["actions"][23:24], 5, 0))
    assert samples.prompt[0] == tuple(MiniOFT.random(TINY).tokenizer.prompt_ids(INSTRUCTIONS[0]))
    assert cfg.steps == 6


def test_gripper_switch_frames_are_drawn_more_often():
    gripper = np.array([[-1] * 8, [-1] * 5 + [1] * 3, [1] * 8, [1] * 6 + [-1] * 2], dtype=np.float32)
    chunks = np.zeros((4, 8, 7), np.float32)
    chunks[..., -1] = gripper
    samples = Samples(torch.zeros(4, 2, 3, 8, 8, dtype=torch.uint8), np.zeros((4, 8)), chunks,
                      [(1, 2)] * 4, np.zeros(4, int))
    weights = switch_weights(samples, 4.0)
    assert weights.tolist() == [1.0, 4.0, 1.0, 4.0]
    stream = batches(samples, np.arange(4), 4, np.random.default_rng(0), weights)
    drawn = np.concatenate([next(stream) for _ in range(500)])
    share = np.isin(drawn, [1, 3]).mean()
    assert abs(share - 0.8) < 0.05  # 8 of 10 weight units


def test_augment_shifts_and_jitters_but_keeps_range():
    cfg = TrainConfig(shift=2, jitter=0.2)
    images = torch.randint(0, 256, (3, 2, 3, 16, 16), dtype=torch.uint8)
    out = augment(images, cfg, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images.float() / 255)
    same = augment(images, TrainConfig(shift=0, jitter=0), torch.Generator())
    assert torch.equal(same, images.float() / 255)


def test_training_is_reproducible_and_saves_a_loadable_policy(tmp_path):
    cfg = tiny_config(tmp_path)
    first = train(cfg, tmp_path / "a.safetensors", log=lambda m: None)
    second = train(cfg, tmp_path / "b.safetensors", log=lambda m: None)
    assert first["history"] == [{**r, "minutes": s["minutes"]} for r, s in
                                zip(second["history"], first["history"])]
    a, info = load_model(tmp_path / "a.safetensors")
    b, _ = load_model(tmp_path / "b.safetensors")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert info["trained"] and first["neutral_action_dims"] == [3, 4, 5]
    assert first["neutral_proprio_dims"] == [3, 4, 5]
    # a neutral action dimension is predicted as exactly its constant (rotation never drifts)
    from tests.conftest import make_observation

    action = a.predict(make_observation())
    assert torch.all(action[:, 3:6] == 0)


def test_training_learns_what_the_inputs_say(tmp_path):
    from prunebench.contract.strategy import Observation

    cfg = tiny_config(tmp_path, steps=200, eval_every=50, lr=1e-3, warmup=10, val_fraction=0.0)
    summary = train(cfg, tmp_path / "w.safetensors", log=lambda m: None)
    start, end = summary["history"][0]["train_l1"], summary["history"][-1]["train_l1"]
    assert end < 0.5 * start
    model, _ = load_model(tmp_path / "w.safetensors")
    dx = []
    for task in (0, 1):
        images = {v: np.full((32, 32, 3), 40 + 170 * task, np.uint8) for v in ("agentview", "wrist")}
        action = model.predict(Observation(images, np.zeros(8, np.float32), INSTRUCTIONS[task]))
        dx.append(float(action[:, 0].mean()))
    assert dx[0] < -0.5 and dx[1] > 0.5  # each task's own motion


def test_demo_noise_is_the_tasks_own_std_in_the_noisy_share_of_demos():
    from prunebench.training.demos import DemoConfig, noise_std

    cfg = DemoConfig.model_validate({"noise": 0.3, "noise_per_task": {"5": 0.15}, "noisy_fraction": 0.75})
    stds = {t: [noise_std(cfg, t, np.random.default_rng(seed)) for seed in range(400)] for t in (4, 5)}
    assert set(stds[4]) == {0.0, 0.3} and set(stds[5]) == {0.0, 0.15}
    assert 0.65 < np.mean(np.array(stds[5]) > 0) < 0.85  # about noisy_fraction of the demos
    with pytest.raises(ValueError, match="noise_per_task"):
        DemoConfig.model_validate({"noise_per_task": {"5": -0.1}})


def test_tasks_pick_the_demonstrations_a_run_trains_on(tmp_path, capsys):
    from prunebench.cli.main import main

    cfg = tiny_config(tmp_path, tasks=[1])
    summary = train(cfg, tmp_path / "one.safetensors", log=lambda m: None)
    assert summary["demos"] == 3  # tasks 0 and 1 have 3 demonstrations each
    assert train(tiny_config(tmp_path), tmp_path / "all.safetensors", log=lambda m: None)["demos"] == 6
    code = main(["train", "--data", cfg.data, "--tasks", "1", "7", "-o", str(tmp_path / "x.safetensors")])
    assert code == 2 and "no demonstrations of task(s) [7]" in capsys.readouterr().err
