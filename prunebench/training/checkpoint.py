"""What lets ``prunebench train`` resume (prunebench.training.train) after a stop without warning.

At every evaluation the trainer replaces ``<output>.ckpt`` with everything the steps after it
depend on: weights, optimiser, step, history and every RNG state. The sample stream needs nothing
more: between batches its only state is its numpy generator's (``train.batches`` draws nothing
ahead). A resume continues to the same weights, bit for bit, as a run never stopped, so it must use
the same config and dataset: anything else is refused, naming what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.results import temp_beside
from prunebench.models.mini_oft import MiniOFTConfig


def checkpoint_path(output: str | Path) -> Path:
    """Where a run writing ``output`` keeps what it needs to resume."""
    return Path(f"{output}.ckpt")


def run_config(cfg: BaseModel, n_demos: int) -> dict:
    """What a resume must share with the run it continues, flat ("model.hidden_size") with the
    model's sizes filled in ({} and the defaults spelled out are the same model)."""
    model = json.loads(MiniOFTConfig(**cfg.model).model_dump_json())
    return {**json.loads(cfg.model_dump_json(exclude={"model"})),
            **{f"model.{k}": v for k, v in model.items()}, "demos": n_demos}


def capture(model, opt, rng: np.random.Generator, gen: torch.Generator, **progress) -> dict:
    """The trainer's state; ``progress``: config, step, history, running (what train() keeps)."""
    return {**progress, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": {"numpy": rng.bit_generator.state, "augment": gen.get_state(),
                    "torch": torch.get_rng_state()}}


def restore(state: dict, model, opt, rng: np.random.Generator, gen: torch.Generator) -> None:
    """The inverse of :func:`capture`, into a trainer set up as the first run was."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["rng"]["numpy"]
    gen.set_state(state["rng"]["augment"])
    torch.set_rng_state(state["rng"]["torch"])


def write_checkpoint(path: Path, state: dict) -> None:
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path, config: dict) -> dict:
    """The checkpoint at ``path``, refused (one line) unless it was written with ``config``."""
    try:
        state = torch.load(path, weights_only=True)  # tensors and plain values only: no code runs
        saved = state["config"]
    except FileNotFoundError:
        raise PrunebenchError(f"cannot resume: no checkpoint {path} (a run keeps one from its first "
                              f"evaluation until it completes)") from None
    except Exception as err:  # truncated, or not ours: one line, not a traceback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrunebenchError(f"cannot resume from {path}: {reason}") from None
    differ = [f"{k} ({saved.get(k)!r} in the checkpoint, {config.get(k)!r} now)"
              for k in sorted(saved.keys() | config.keys()) if saved.get(k) != config.get(k)]
    if differ:
        raise PrunebenchError(f"cannot resume from {path}: it differs in {', '.join(differ)}; resume "
                              f"with the same config and data, or start over with --overwrite")
    return state


def replace_atomically(path: Path, write) -> None:
    """``write(tmp)``, then rename over ``path``: a kill leaves the old file or the new one, never
    part of one. The temporary name is unique, so two runs never write the same one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)  # created with the user's file mode
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)  # the writer may have made a new file under the name
        try:
            os.fchmod(fd, mode)  # safetensors' writer creates it 0o600, which the rename would keep
            os.fsync(fd)  # the data on disk before the rename
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
