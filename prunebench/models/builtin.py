"""The built-in model families, registered through the same hook a third party uses
(``prunebench_register_models``): OpenVLA-OFT checkpoints, then MiniOFT (the built-in policy)."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunebench.contract.errors import PrunebenchError
from prunebench.contract.model import ModelFamily
from prunebench.models.mini_oft import MiniOFT
from prunebench.plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.models.openvla_oft import OpenVLAOFT

DEFAULT_SUITE = "libero_object"  # whose weights load when no suite is named (engine benchmarks)


def weights_folder() -> Path:
    """Where the built-in policy's shipped weights live: ``mini_oft_<suite>.safetensors``, one
    file per LIBERO suite, as OpenVLA-OFT ships one checkpoint per suite."""
    return Path(str(resources.files("prunebench.models").joinpath("weights")))


def shipped_suites() -> list[str]:
    """The suites the package ships built-in policy weights for."""
    return sorted(p.stem.removeprefix("mini_oft_") for p in weights_folder().glob("mini_oft_*.safetensors"))


def builtin_weights(suite: str | None = None) -> Path | None:
    """Path of the shipped weights for ``suite`` (a LIBERO-PRO variant such as
    ``libero_object_swap`` uses its base suite's; None: libero_object's), or None while the
    package ships none at all. A suite without weights of its own is an error."""
    shipped = shipped_suites()
    if not shipped:
        return None
    if suite is None:
        suite = DEFAULT_SUITE
    bases = [s for s in shipped if suite == s or suite.startswith(s + "_")]
    if not bases:
        raise PrunebenchError(f"--suite {suite}: the built-in policy ships weights for {', '.join(shipped)} "
                              f"only; train one for {suite} (docs/policy.md) and pass --model FILE")
    base = max(bases, key=len)
    return weights_folder() / f"mini_oft_{base}.safetensors"


# ------------------------------------------------------------------------------------ MiniOFT
def claims_mini_oft(source: str | None) -> bool:
    """No ``--model`` (the shipped weights, else a random init), a .safetensors name or a file."""
    return source is None or source.endswith(".safetensors") or Path(source).is_file()


def load_mini_oft(source: str | None, *, seed: int = 0, suite: str | None = None,
                  device: str = "cpu") -> tuple[MiniOFT, dict]:
    """The MiniOFT file ``source``, else the shipped weights for ``suite``, else (none shipped at
    all) a random init from ``seed``."""
    path = Path(source) if source else builtin_weights(suite)
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


# ------------------------------------------------------------------------------------ OpenVLA-OFT
def claims_openvla_oft(source: str | None) -> bool:
    """A checkpoint directory (config.json with a vision_backbone_id) or a hub id ``owner/name``."""
    from prunebench.models.oft_checkpoint import is_oft_checkpoint

    return bool(source) and is_oft_checkpoint(source)


_OFT_LOADED: dict[tuple, tuple] = {}


def load_openvla_oft(source: str, *, seed: int = 0, suite: str | None = None,
                     device: str = "cpu") -> tuple[OpenVLAOFT, dict]:
    """The checkpoint, in bfloat16 on a GPU and float32 on the CPU; ``suite`` picks its
    normalisation statistics. Loaded once per process (15 GB; a comparison runs many strategies)."""
    key = (str(source), suite, str(device))
    if key not in _OFT_LOADED:
        _OFT_LOADED.clear()
        _OFT_LOADED[key] = _load_oft(source, suite, device)
    model, info = _OFT_LOADED[key]
    return model, dict(info)


def _load_oft(path, suite: str | None, device: str):
    from prunebench.models.oft_checkpoint import load_oft

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = load_oft(path, suite=suite, device=device, dtype=dtype)
    info = {"source": str(path), "trained": True, "kind": "openvla-oft", "unnorm_key": model.unnorm_key,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "config": model.cfg.model_dump(),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, info


def openvla_oft_depth(source: str) -> int:
    """Decoder layers from the checkpoint's config.json (32 for the released 7B checkpoints)."""
    from prunebench.models.oft_checkpoint import read_config

    layers = read_config(source)["text_config"].get("num_hidden_layers")
    if not isinstance(layers, int):
        raise PrunebenchError(f"{source}: config.json has no text_config.num_hidden_layers")
    return layers


FAMILIES = (
    ModelFamily("openvla-oft", claims_openvla_oft, load_openvla_oft,
                "an OpenVLA-OFT checkpoint directory or hub id such as "
                "moojink/openvla-7b-oft-finetuned-libero-object", depth=openvla_oft_depth),
    ModelFamily("mini-oft", claims_mini_oft, load_mini_oft,
                "a MiniOFT .safetensors file; no --model: the built-in policy"),
)


@hookimpl
def prunebench_register_models() -> list[ModelFamily]:
    return list(FAMILIES)
