"""Models the engine can run. Each exposes ``encode``, ``llm`` (layers, norm, rotary), ``head``,
``unnormalize_actions`` and ``patch_pixels``; see mini_oft.py."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from prunebench.errors import PrunebenchError
from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig

BUILTIN_WEIGHTS = "weights/mini_oft.safetensors"


def builtin_weights() -> Path | None:
    """Path of the shipped trained weights, or None while the package ships none."""
    path = Path(str(resources.files("prunebench.models").joinpath(BUILTIN_WEIGHTS)))
    return path if path.is_file() else None


def load_model(path: str | Path | None = None, seed: int = 0) -> tuple[MiniOFT, dict]:
    """The model at ``path``, else the shipped weights, else a random init from ``seed``.

    Returns the model and a description for results files (source, sha256, config).
    """
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
    return model, info


__all__ = ["MiniOFT", "MiniOFTConfig", "load_model", "builtin_weights"]
