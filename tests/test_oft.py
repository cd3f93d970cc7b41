"""The OpenVLA-OFT adapter at toy width: the released module structure and file layout, random weights."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prunebench.contract.errors import PrunebenchError
from prunebench.contract.strategy import Observation
from prunebench.engine.loop import PruningEngine
from prunebench.engine.transformers_compat import HAS_ATTENTION_REGISTRY
from prunebench.models import load_model
from prunebench.models.oft_checkpoint import load_oft, unnorm_key
from prunebench.models.oft_images import center_crop, oft_frame
from prunebench.models.oft_modules import VISION_BACKBONES, VisionTower
from prunebench.models.oft_tiny import build_tiny_oft, tiny_norm_stats, write_tiny_checkpoint
from prunebench.plugins.manager import MANAGER


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("oft") / "tiny-oft", seed=0)


@pytest.fixture(scope="module")
def oft(checkpoint):
    model, _ = load_model(checkpoint, suite="libero_object")
    return model


@pytest.fixture(scope="module")
def oft_obs():
    rng = np.random.default_rng(1)
    frame = lambda: rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # noqa: E731 - LIBERO renders 256 px
    return Observation(images={"agentview": frame(), "wrist": frame()},
                       proprio=rng.normal(0, 0.2, 8).astype(np.float32),
                       instruction="Pick up the ketchup and place it in the basket")


def test_checkpoint_loads_every_tensor_and_equals_the_model_it_was_written_from(oft, oft_obs):
    built = build_tiny_oft(seed=0)
    for (name, a), b in zip(built.state_dict().items(), oft.state_dict().values()):
        assert torch.equal(a, b), name
    assert oft.unnorm_key == "libero_object_no_noops"


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_engine_dense_loop_equals_the_models_own_forward(checkpoint, oft_obs, backend):
    model = load_oft(checkpoint, suite="libero_object", dtype=torch.float32, attn_implementation=backend)
    ours = PruningEngine(model).query(MANAGER.create("none"), oft_obs).normalized
    own = model.predict_normalized(oft_obs)  # LlamaModel.forward, read at predict_action's offsets
    assert np.abs(ours - own).max() < 1e-5


def test_layout_is_openvla_oft_s(oft, oft_obs):
    layout = oft.encode(oft_obs).layout
    n_prompt = len(oft.prompt_ids(oft_obs.instruction))
    assert [(v.start, v.rows, v.cols) for v in layout.views] == [(1, 16, 16), (257, 16, 16)]
    assert layout.proprio == (513, 514) and layout.prompt == (514, 514 + n_prompt)
    assert layout.actions == (514 + n_prompt, 570 + n_prompt) and layout.length == 571 + n_prompt
    assert layout.readout_slots().tolist() == list(range(513 + n_prompt, 569 + n_prompt))
    assert len(layout.template) == 9 + 4  # "In : What action should the robot take to" | "? Out : ▁"
    assert oft.prompt_ids(oft_obs.instruction)[-1] == oft.tokenizer.convert_tokens_to_ids("▁")


def test_every_strategy_runs_unchanged_on_the_oft_structure(oft, oft_obs):
    engine = PruningEngine(oft)
    dense = engine.query(MANAGER.create("none"), oft_obs)
    for name in MANAGER.strategies():
        strategy = MANAGER.create(name)
        if strategy.reuses_kv and not HAS_ATTENTION_REGISTRY:
            continue  # reuse needs transformers >= 4.48 (docs/engine.md)
        for query in range(2):  # a second query of the same frame: the cross-query strategies act
            out = engine.query(strategy, oft_obs, query_index=query, frames=[oft_obs.images] * 3)
            assert np.isfinite(out.actions).all(), name
            assert out.record.llm_flops <= dense.record.llm_flops, name
            assert min(out.record.visual_per_layer) <= 512, name
    pruned = engine.query(MANAGER.create("random", {"keep_ratio": 0.25}), oft_obs)
    assert pruned.record.visual_per_layer[0] == 128


def test_model_paths_are_told_apart(checkpoint, tmp_path):
    from prunebench.models.oft_checkpoint import is_oft_checkpoint

    assert is_oft_checkpoint(checkpoint) and is_oft_checkpoint("moojink/openvla-7b-oft-finetuned-libero-object")
    assert not is_oft_checkpoint("data/missing.safetensors") and not is_oft_checkpoint(tmp_path)
    with pytest.raises(PrunebenchError, match="model weights not found: data/missing.safetensors"):
        load_model("data/missing.safetensors")


def test_norm_stats_are_chosen_by_suite():
    stats = tiny_norm_stats()
    assert unnorm_key(stats, "libero_goal") == "libero_goal_no_noops"
    assert unnorm_key({"only": {}}, None) == "only"
    with pytest.raises(PrunebenchError, match="no norm stats for suite 'libero_90'.*libero_10_no_noops"):
        unnorm_key(stats, "libero_90")
    with pytest.raises(PrunebenchError, match="several datasets"):
        unnorm_key(stats, None)


def test_norm_stats_are_read_from_dataset_statistics_json_first(checkpoint, tmp_path):
    """OFT's fine-tuning writes the LIBERO statistics to dataset_statistics.json and its evaluation reads
    them from there; config.json may hold only the base model's."""
    root = shutil.copytree(checkpoint, tmp_path / "finetuned")
    libero = tiny_norm_stats()["libero_object_no_noops"]
    config = json.loads((root / "config.json").read_text())
    config["norm_stats"] = {"bridge_orig": libero}
    (root / "config.json").write_text(json.dumps(config))
    (root / "dataset_statistics.json").write_text(json.dumps({"libero_object_no_noops": libero}))
    assert load_oft(root, suite="libero_object", dtype=torch.float32).unnorm_key == "libero_object_no_noops"

    shifted = json.loads(json.dumps(libero))
    shifted["action"]["q99"][0] = 0.5
    config["norm_stats"] = {"libero_object_no_noops": libero}
    (root / "config.json").write_text(json.dumps(config))
    (root / "dataset_statistics.json").write_text(json.dumps({"libero_object_no_noops": shifted}))
    model = load_oft(root, suite="libero_object", dtype=torch.float32)
    assert model.norm_stats["libero_object_no_noops"]["action"]["q99"][0] == 0.5  # the file wins

    (root / "dataset_statistics.json").unlink()  # without it, config.json's
    assert load_oft(root, suite="libero_object", dtype=torch.float32).norm_stats == config["norm_stats"]


def test_rotary_inv_freq_stays_float32_in_a_bfloat16_model(checkpoint):
    """OFT keeps the rotary inv_freq in float32 in its bfloat16 model; a bfloat16 copy moves the angles."""
    from prunebench.engine.transformers_compat import rotary

    reference = build_tiny_oft(seed=0)  # float32
    expected = {n: b for n, b in reference.named_buffers() if n.endswith("inv_freq")}
    assert expected
    positions = torch.arange(600)[None]
    h = torch.zeros(1, 600, reference.llm.config.hidden_size)
    ref_cos, ref_sin = rotary(reference.llm, h, positions)
    for model in (load_oft(checkpoint, suite="libero_object", dtype=torch.bfloat16),
                  build_tiny_oft(seed=0).bfloat16()):
        assert model.dtype == torch.bfloat16
        buffers = {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}
        assert buffers.keys() == expected.keys()
        for name, buffer in buffers.items():
            assert buffer.dtype == torch.float32 and torch.equal(buffer, expected[name]), name
        cos, sin = rotary(model.llm, h.bfloat16(), positions)  # what the bfloat16 forward uses
        assert torch.equal(cos, ref_cos.bfloat16()) and torch.equal(sin, ref_sin.bfloat16())


def test_action_and_proprio_normalisation_follow_bounds_q99(oft):
    stats = tiny_norm_stats()["libero_object_no_noops"]
    q01, q99 = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    normalized = torch.tensor([[-1.0] * 6 + [0.9], [1.0] * 6 + [0.1]])
    actions = oft.unnormalize_actions(normalized).numpy()
    assert np.allclose(actions[0, :6], q01[:6]) and np.allclose(actions[1, :6], q99[:6], atol=1e-6)
    assert actions[0, 6] == -1.0 and actions[1, 6] == 1.0  # dataset 1 = open -> env -1 = open
    assert np.allclose(oft.normalize_q99(oft.unnormalize_q99(normalized.numpy())), normalized.numpy(), atol=1e-6)
    p01, p99 = np.array(stats["proprio"]["q01"]), np.array(stats["proprio"]["q99"])
    assert torch.allclose(oft.normalize_proprio(p01), -torch.ones(8), atol=1e-6)
    assert torch.allclose(oft.normalize_proprio(p99 + 10), torch.ones(8))  # clipped


def test_centre_crop_is_tensorflows_crop_and_resize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = center_crop(image)
    # reference: the box [lo, hi] of side sqrt(0.9), sampled bilinearly at 224 points per axis
    lo = (1 - np.sqrt(0.9)) / 2
    coords = lo * 223 + np.arange(224) * np.sqrt(0.9) * 223 / 223
    for y, x in [(0, 0), (100, 37), (223, 223)]:
        cy, cx = coords[y], coords[x]
        y0, x0 = int(np.floor(cy)), int(np.floor(cx))
        y1, x1 = min(y0 + 1, 223), min(x0 + 1, 223)
        fy, fx = cy - y0, cx - x0
        f = image.astype(np.float64) / 255
        value = ((1 - fy) * ((1 - fx) * f[y0, x0] + fx * f[y0, x1]) + fy * ((1 - fx) * f[y1, x0] + fx * f[y1, x1]))
        assert np.abs(out[y, x].astype(int) - np.floor(value * 255.5).astype(int)).max() <= 1
    flat = np.full((224, 224, 3), 77, np.uint8)
    assert (center_crop(flat) == 77).all()
    assert oft_frame(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), 224).shape == (224, 224, 3)


def test_loader_errors_name_the_file_or_tensor(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "no-head")
    next(broken.glob("action_head--*_checkpoint.pt")).unlink()
    with pytest.raises(PrunebenchError, match=r"no action_head--<step>_checkpoint.pt"):
        load_oft(broken, suite="libero_object")
    reshaped = shutil.copytree(checkpoint, tmp_path / "bad-shape")
    index = json.loads((reshaped / "model.safetensors.index.json").read_text())
    shard = reshaped / index["weight_map"]["projector.fc3.weight"]
    state = load_file(str(shard))
    state["projector.fc3.weight"] = torch.zeros(3, 3)
    save_file(state, str(shard))
    with pytest.raises(PrunebenchError, match=r"'projector.fc3.weight' has shape \(3, 3\)"):
        load_oft(reshaped, suite="libero_object")
    with pytest.raises(PrunebenchError, match="checkpoint file missing"):
        load_oft(tmp_path, suite="libero_object")
    with pytest.raises(PrunebenchError, match="no norm stats for suite 'libero_90'"):
        load_oft(checkpoint, suite="libero_90")


def test_check_command_reports_no_difference_against_the_adapters_own_forward(checkpoint, capsys):
    from prunebench.cli.main import main

    code = main(["check-oft", str(checkpoint), "--suite", "libero_spatial", "--synthetic", "--device", "cpu",
                 "--reference", "adapter", "--observations", "2", "--tolerance", "1e-5"])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out and "synthetic frames" in out


def test_check_command_says_the_openvla_reference_runs_the_checkpoints_code(checkpoint, capsys, monkeypatch):
    from prunebench.cli.main import main

    monkeypatch.setitem(sys.modules, "prismatic.models.action_heads", None)  # OFT's code: not installed
    code = main(["check-oft", str(checkpoint), "--suite", "libero_object", "--synthetic", "--device", "cpu",
                 "--reference", "openvla", "--trust-remote-code", "--observations", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "trust_remote_code=True" in err and "needs OpenVLA-OFT's code" in err


def test_vision_towers_match_timm():
    """Our towers against timm's own ViT (what OFT builds), when timm is installed (the compat env)."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    for spec in VISION_BACKBONES["prunebench-tiny-dinosiglip"]:
        torch.manual_seed(0)
        timm_vit = vision_transformer.VisionTransformer(
            img_size=224, patch_size=spec.patch, embed_dim=spec.embed_dim, depth=spec.depth,
            num_heads=spec.heads, mlp_ratio=spec.mlp_hidden / spec.embed_dim, class_token=spec.class_token,
            reg_tokens=spec.registers, no_embed_class=True, init_values=0.5 if spec.layer_scale else None,
            global_pool="token" if spec.class_token else "avg", num_classes=0).eval()
        ours = VisionTower(spec, 224).eval()
        skip = (f"blocks.{spec.depth - 1}.", "norm.", "fc_norm.", "head.")
        state = {k.replace(".gamma", ".scale_factor"): v for k, v in timm_vit.state_dict().items()
                 if not k.startswith(skip)}
        ours.load_state_dict(state, strict=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            expected = timm_vit.get_intermediate_layers(x, n={spec.depth - 2})[0]
            assert torch.allclose(ours(x), expected, atol=1e-5)


def test_gpu_benchmark_script_runs_at_toy_width(tmp_path):
    """benchmarks/gpu_oft7b.py measures the 7B shape on a GPU; --smoke runs the same code on the CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_oft7b.py"
    spec = importlib.util.spec_from_file_location("gpu_oft7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    assert module.main(["--smoke", "--rounds", "1", "--warmup", "1", "--strategies", "random", "specprune-vla",
                        "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["strategy"] for r in report["rows"]] == ["none", "random", "specprune-vla"]
    assert report["sequence_length"] == 571 + report["prompt_tokens"]
    random_row = report["rows"][1]
    assert random_row["mean_visual_tokens"] == 256 and random_row["flops_ideal_speedup"] > 1.5



def test_gpu_profile_script_runs_at_toy_width(tmp_path, monkeypatch):
    """benchmarks/gpu_profile.py profiles the 7B shape's queries on a GPU; --smoke runs it on the CPU."""
    from pathlib import Path

    benchmarks = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    import gpu_profile

    out = tmp_path / "profile.json"
    assert gpu_profile.main(["--smoke", "--queries", "1", "--warmup", "1", "--strategies", "none", "fastv",
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["strategy"] for r in report["rows"]] == ["none", "fastv"]
    assert all(r["wall_ms"] > 0 and r["top_host_ops"] for r in report["rows"])
    assert report["vision"]["image_pipeline_ms"] > 0

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_in_bfloat16_every_strategy_runs_and_dense_matches_the_own_forward(checkpoint, oft_obs):
    model = load_oft(checkpoint, suite="libero_object", device="cuda", dtype=torch.bfloat16)
    engine = PruningEngine(model)
    dense = engine.query(MANAGER.create("none"), oft_obs)
    assert np.abs(dense.normalized - model.predict_normalized(oft_obs)).max() < 2e-2
    assert dense.record.ms["llm"] > 0
    for name in MANAGER.strategies():
        strategy = MANAGER.create(name)
        for query in range(2):
            out = engine.query(strategy, oft_obs, query_index=query, frames=[oft_obs.images] * 3)
            assert np.isfinite(out.actions).all(), name


def test_the_depth_of_a_checkpoint_comes_from_its_config_alone(checkpoint, oft, tmp_path):
    from prunebench.models import model_depth

    assert model_depth(str(checkpoint)) == oft.n_layers  # config.json only: no weights loaded
    config = json.loads((checkpoint / "config.json").read_text())
    del config["text_config"]["num_hidden_layers"]
    stripped = tmp_path / "no-depth"
    stripped.mkdir()
    (stripped / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrunebenchError, match="no text_config.num_hidden_layers"):
        model_depth(str(stripped))
    del config["text_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrunebenchError, match="no 'text_config' object"):
        model_depth(str(stripped))
