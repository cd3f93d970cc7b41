"""Resumable training: a run stopped without warning continues from its last checkpoint to the same
weights, bit for bit, as a run never stopped; a resume with another config, and an existing output
or checkpoint without --resume/--overwrite, are refused with one line."""

import json
import os

import pytest
import torch

from prunebench.cli.main import main
from prunebench.models.mini_oft import MiniOFT
from prunebench.training import train as training
from prunebench.training.checkpoint import checkpoint_path
from prunebench.training.train import train
from tests.test_outputs import error_lines
from tests.test_training import tiny_config


def stop_at(step: int):
    """A log that stops the run (as Ctrl-C would) once the evaluation of ``step`` is logged: its
    checkpoint is on disk."""
    def log(message: str) -> None:
        if message.startswith("{") and json.loads(message)["step"] == step:
            raise KeyboardInterrupt
    return log


def stop_in_step(monkeypatch, step: int) -> None:
    """Stop the run inside training step ``step`` (1-based), between two checkpoints: the steps
    done since the last one are lost and must be redone identically."""
    augment, calls = training.augment, []

    def stopping(*args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return augment(*args)
    monkeypatch.setattr(training, "augment", stopping)


def rows(summary: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "minutes"} for row in summary["history"]]


@pytest.mark.parametrize("where", ["right after a checkpoint", "between checkpoints"])
def test_a_stopped_run_resumes_to_the_same_weights_as_a_run_never_stopped(tmp_path, monkeypatch, where):
    cfg = tiny_config(tmp_path, steps=9, eval_every=3)
    whole = train(cfg, tmp_path / "whole.safetensors", log=lambda m: None)
    assert not checkpoint_path(tmp_path / "whole.safetensors").exists()  # removed once complete
    umask = os.umask(0o022)
    os.umask(umask)
    # the user's file mode, as any file they make (safetensors' writer alone would leave 0o600)
    assert os.stat(tmp_path / "whole.safetensors").st_mode & 0o777 == 0o666 & ~umask

    out = tmp_path / "out" / "policy.safetensors"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        if where == "right after a checkpoint":
            train(cfg, out, log=stop_at(3))
        else:
            stop_in_step(patch, 5)  # checkpoint at step 3, steps 4 and 5 lost
            train(cfg, out, log=lambda m: None)
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy.safetensors", "policy.safetensors.ckpt"]
    assert MiniOFT.load(out)  # the weights at step 3 are a usable policy already

    logged = []
    resumed = train(cfg, out, log=logged.append, resume=True)
    assert f"resumed from {checkpoint_path(out)} at step 3" in logged
    assert [json.loads(m)["step"] for m in logged if m.startswith("{")] == [6, 9]
    assert rows(resumed) == rows(whole) and resumed["complete"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy.safetensors"]
    a, b = MiniOFT.load(tmp_path / "whole.safetensors"), MiniOFT.load(out)
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, x in a.state_dict().items():
        assert torch.equal(x, b.state_dict()[name]), name


def cli_config(tmp_path) -> str:
    path = tmp_path / "train.json"
    path.write_text(tiny_config(tmp_path, steps=6, eval_every=3).model_dump_json())
    return str(path)


def test_a_resume_with_another_config_is_refused(tmp_path, monkeypatch, capsys):
    config, out = cli_config(tmp_path), tmp_path / "policy.safetensors"
    monkeypatch.setattr(training, "main_log", stop_at(3))
    assert main(["train", "--config", config, "-o", str(out)]) == 130  # interrupted, as by Ctrl-C
    before = checkpoint_path(out).read_bytes(), out.read_bytes()
    capsys.readouterr()

    assert main(["train", "--config", config, "--steps", "7", "--seed", "1", "-o", str(out),
                 "--resume"]) == 2
    [line] = error_lines(capsys)
    assert "cannot resume" in line and "steps (6 in the checkpoint, 7 now)" in line
    assert "seed (0 in the checkpoint, 1 now)" in line and "lr" not in line
    assert (checkpoint_path(out).read_bytes(), out.read_bytes()) == before  # both left as they were

    monkeypatch.setattr(training, "main_log", lambda m: None)
    assert main(["train", "--config", config, "-o", str(out), "--resume"]) == 0
    assert not checkpoint_path(out).exists()


def test_an_existing_output_or_checkpoint_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    def no_work(*args):
        raise AssertionError("the command got as far as loading the demos")
    monkeypatch.setattr(training, "load_samples", no_work)
    config, out = cli_config(tmp_path), tmp_path / "policy.safetensors"
    ckpt = checkpoint_path(out)
    train_cmd = ["train", "--config", config, "-o", str(out)]

    assert main(train_cmd + ["--resume"]) == 2  # nothing to resume
    [line] = error_lines(capsys)
    assert "no checkpoint" in line and str(ckpt) in line
    assert not out.exists()  # its claim on the output is released

    out.write_bytes(b"weights")
    assert main(train_cmd) == 2
    [line] = error_lines(capsys)
    assert str(out) in line and "exists" in line and "--overwrite" in line

    ckpt.write_bytes(b"not a checkpoint")
    assert main(train_cmd) == 2
    [line] = error_lines(capsys)
    assert str(ckpt) in line and "--resume" in line and "--overwrite" in line
    assert main(train_cmd + ["--resume"]) == 2  # unreadable: one line too
    [line] = error_lines(capsys)
    assert line.startswith(f"error: cannot resume from {ckpt}")
    with pytest.raises(SystemExit) as exit:  # a bad combination of flags, refused by the parser
        main(train_cmd + ["--resume", "--overwrite"])
    assert exit.value.code == 2 and len(error_lines(capsys)) == 1
    assert out.read_bytes() == b"weights" and ckpt.read_bytes() == b"not a checkpoint"
