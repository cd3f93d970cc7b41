"""MiniOFT files: one safetensors file holding the weights and the normalisation statistics, with
the config and the vocabulary in its metadata (written by ``MiniOFT.save``, read by ``MiniOFT.load``).

Reading checks the file's header (metadata and tensor shapes) before any weight is allocated: a bad
file is one PrunebenchError naming it and what is wrong, and no file can ask for more than
MAX_PARAMETERS.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunebench.contract.errors import PrunebenchError
from prunebench.models.tokenizer import WordTokenizer
from prunebench.runtime.inputs import one_line

MAX_PARAMETERS = 1_000_000_000
"""The most parameters a MiniOFT file may ask for (4 GB of float32; the shipped model has 1.4 M):
checked on the config before anything is allocated."""


def write_file(model: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """``model``'s state, config (``model.cfg``) and vocabulary (``model.tokenizer``) as one file."""
    meta = {"config": model.cfg.model_dump_json(), "vocab": json.dumps(model.tokenizer.vocab),
            "extra": json.dumps(extra or {})}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def read_header(path: str | Path, config_cls: type[BaseModel]) -> tuple[BaseModel, WordTokenizer, dict]:
    """The config (validated as ``config_cls``), the vocabulary and the tensor shapes of a file,
    without reading any weight."""
    with safetensors_errors(path), safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    cfg, tokenizer = config_and_tokenizer(meta, path, config_cls)
    return cfg, tokenizer, shapes


def check_header(path: str | Path, shapes: dict[str, tuple], expected: nn.Module) -> None:
    """``expected`` (the model the file's config describes, built on the ``meta`` device) is within
    MAX_PARAMETERS and has exactly the file's tensors and shapes."""
    n_params = sum(p.numel() for p in expected.parameters())
    if n_params > MAX_PARAMETERS:
        raise PrunebenchError(f"{path}: its config asks for {n_params:,} parameters, more than a "
                              f"MiniOFT file may ({MAX_PARAMETERS:,}; docs/model.md)")
    check_shapes(path, shapes, {k: tuple(v.shape) for k, v in expected.state_dict().items()})


def load_weights(model: nn.Module, path: str | Path) -> None:
    """The file's tensors into ``model`` (after :func:`check_header`)."""
    with safetensors_errors(path):
        model.load_state_dict(load_file(str(path)))


@contextmanager
def safetensors_errors(path: str | Path):
    """A file safetensors cannot read (not safetensors, truncated, unreadable) as one line naming it."""
    try:
        yield
    except (SafetensorError, OSError) as err:
        raise PrunebenchError(f"{path}: not a readable safetensors file "
                              f"({str(err).removeprefix('Error while deserializing header: ')})") from None


def config_and_tokenizer(meta: dict[str, str], path: str | Path,
                         config_cls: type[BaseModel]) -> tuple[BaseModel, WordTokenizer]:
    """The config and vocabulary ``MiniOFT.save`` stores in the file's metadata."""
    for key in ("config", "vocab"):
        if key not in meta:
            raise PrunebenchError(f"{path}: metadata has no {key!r} (not a file written by MiniOFT.save)")
    try:
        cfg = config_cls.model_validate_json(meta["config"])
    except ValidationError as err:
        raise PrunebenchError(one_line(err, f"{path}: metadata 'config': ")) from None
    try:
        vocab = json.loads(meta["vocab"])
    except json.JSONDecodeError as err:
        raise PrunebenchError(f"{path}: metadata 'vocab' is not JSON ({err})") from None
    # at least the four special tokens (pad, bos, eos, unk), which the model's ids assume
    if not (isinstance(vocab, list) and len(vocab) >= 4 and all(isinstance(w, str) for w in vocab)):
        raise PrunebenchError(f"{path}: metadata 'vocab' must be a JSON list of at least 4 words")
    return cfg, WordTokenizer(vocab)


def check_shapes(path: str | Path, shapes: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """The file holds exactly the tensors the config describes, with their shapes."""
    def first(names: list[str]) -> str:
        return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")

    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise PrunebenchError(f"{path}: lacks tensor {first(missing)}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise PrunebenchError(f"{path}: unexpected tensor {first(unexpected)} for its config")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise PrunebenchError(f"{path}: tensor {name!r} has shape {shapes[name]}, its config asks "
                                  f"for {shape}")
