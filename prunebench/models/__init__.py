"""Models the engine can run. Each exposes ``encode``, ``llm`` (layers, norm, rotary), ``head``,
``unnormalize_actions``, ``preprocess_images`` and ``patch_pixels`` (the engine's
``QueryContext.patch_pixels`` chains these two): the built-in MiniOFT (mini_oft.py) and real
OpenVLA-OFT checkpoints (openvla_oft.py, loaded by oft_checkpoint.py)."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch

from prunebench.contract.errors import PrunebenchError
from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig

BUILTIN_WEIGHTS = "weights/mini_oft.safetensors"


def builtin_weights() -> Path | None:
    """Path of the shipped trained weights, or None while the package ships none."""
    path = Path(str(resources.files("prunebench.models").joinpath(BUILTIN_WEIGHTS)))
    return path if path.is_file() else None


def load_model(path: str | Path | None = None, seed: int = 0, *, suite: str | None = None,
               device: str = "cpu") -> tuple[MiniOFT, dict]:
    """The model at ``path``, else the shipped weights, else a random init from ``seed``.

    ``path`` may be a MiniOFT safetensors file or an OpenVLA-OFT checkpoint (a directory or a hub id
    such as ``moojink/openvla-7b-oft-finetuned-libero-object``); ``suite`` picks the checkpoint's
    normalisation statistics. OFT runs in bfloat16 on a GPU and float32 on the CPU.
    Returns the model and a description for results files (source, sha256, config).
    """
    from prunebench.models.oft_checkpoint import is_oft_checkpoint

    check_device(device)
    if path and is_oft_checkpoint(path):
        key = (str(path), suite, str(device))
        if key not in _OFT_LOADED:  # 15 GB: load once per process (a comparison runs many strategies)
            _OFT_LOADED.clear()
            _OFT_LOADED[key] = _load_oft(path, suite, device)
        model, info = _OFT_LOADED[key]
        return model, dict(info)
    path = Path(path) if path else builtin_weights()
    if path is None:
        model = MiniOFT.random(seed=seed)
        info = {"source": f"random-init(seed={seed})", "trained": False}
    else:
        if not path.is_file():
            raise PrunebenchError(f"model weights not found: {path}")
        model = MiniOFT.load(path)
        info = {"source": str(path), "trained": True,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    info["config"] = model.cfg.model_dump()
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model.to(device), info


_OFT_LOADED: dict[tuple, tuple] = {}


def check_device(device: str) -> None:
    """A one-line error (before any weights load) when ``device`` cannot run here."""
    device = str(device)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no GPU found"
        raise PrunebenchError(f"--device {device}: CUDA is not available to torch {torch.__version__} "
                              f"({why}); use --device cpu")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise PrunebenchError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")


def model_device(model) -> str:
    """Where the model's weights really are (``cpu``, ``cuda:0``)."""
    return str(next(model.parameters()).device)


def _load_oft(path, suite: str | None, device: str):
    from prunebench.models.oft_checkpoint import load_oft

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = load_oft(path, suite=suite, device=device, dtype=dtype)
    info = {"source": str(path), "trained": True, "kind": "openvla-oft", "unnorm_key": model.unnorm_key,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "config": model.cfg.model_dump(),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, info


__all__ = ["MiniOFT", "MiniOFTConfig", "load_model", "builtin_weights", "check_device", "model_device"]
