"""``load_model``: the model families registered through ``prunebench_register_models`` (plugins'
first, then the built-in ones of prunebench.models.builtin), asked in turn which one loads a source."""

from __future__ import annotations

from pathlib import Path

import torch

from prunebench.contract.errors import PluginError, PrunebenchError
from prunebench.contract.model import ModelFamily, VLAModel, missing_members

BUILTIN_PLUGIN = "prunebench.models.builtin"


def load_model(path: str | Path | None = None, seed: int = 0, *, suite: str | None = None,
               device: str = "cpu") -> tuple[VLAModel, dict]:
    """The model ``path`` names (``--model``: a file, a directory or a hub id; None: the built-in
    policy), loaded by the first registered family that claims it.

    Built in: a MiniOFT safetensors file (None: the shipped weights, else a random init from
    ``seed``) or an OpenVLA-OFT checkpoint (a directory or a hub id such as
    ``moojink/openvla-7b-oft-finetuned-libero-object``; ``suite`` picks its normalisation
    statistics; bfloat16 on a GPU, float32 on the CPU).
    Returns the model and a description for results files (source, trained, sha256, config, ...).
    """
    check_device(device)
    family, source = family_for(path)
    model, info = family.load(source, seed=seed, suite=suite, device=device)
    _check_loaded(family, model, info)
    return model, info


def model_depth(path: str | Path | None = None) -> int:
    """Decoder layers of the model ``path`` names (what a study's search space is fitted to): the
    claiming family's ``depth``, else the loaded model's ``n_layers``."""
    family, source = family_for(path)
    if family.depth is not None:
        return int(family.depth(source))
    model, info = family.load(source, seed=0, suite=None, device="cpu")
    _check_loaded(family, model, info)
    return int(model.n_layers)


def family_for(path: str | Path | None) -> tuple[ModelFamily, str | None]:
    """The first registered family that claims ``path`` (None or "": no --model), and the source
    as the family is given it; a source nobody claims is one line naming the known families."""
    source = None if path is None or str(path) == "" else str(path)
    families = model_families()
    for family in families:
        if _claims(family, source):
            return family, source
    known = "; ".join(f"{f.name} ({f.description})" if f.description else f.name for f in families)
    raise PrunebenchError(f"--model {source!r}: no model family loads it (known families: "
                          f"{known or 'none'})")


def model_families() -> list[ModelFamily]:
    """Every registered model family, in the order ``load_model`` asks them: plugins' (in pluggy's
    call order: the last registered first), then the built-in ones."""
    from prunebench.plugins.manager import MANAGER

    MANAGER.load()  # registers the built-in families (prunebench.models.builtin) and plugins
    impls = [i for i in reversed(MANAGER.pm.hook.prunebench_register_models.get_hookimpls())
             if not (getattr(i, "hookwrapper", False) or getattr(i, "wrapper", False))]
    impls.sort(key=lambda impl: impl.plugin_name == BUILTIN_PLUGIN)  # stable: plugins first
    families: list[ModelFamily] = []
    owners: dict[str, str] = {}
    for impl in impls:
        plugin = impl.plugin_name
        returned = impl.function()
        if not isinstance(returned, (list, tuple)) or not all(isinstance(f, ModelFamily) for f in returned):
            raise PluginError(f"plugin {plugin!r}: prunebench_register_models must return a list of "
                              f"prunebench.ModelFamily, got {returned!r:.200}")
        for family in returned:
            if not family.name or not isinstance(family.name, str):
                raise PluginError(f"plugin {plugin!r}: a model family has no name")
            if not (callable(family.claims) and callable(family.load)):
                raise PluginError(f"plugin {plugin!r}: model family {family.name!r} needs callable "
                                  "claims and load")
            if family.name in owners:
                raise PluginError(f"model family {family.name!r} is registered twice: by plugin "
                                  f"{owners[family.name]!r} and by plugin {plugin!r}")
            owners[family.name] = plugin
            families.append(family)
    return families


def _claims(family: ModelFamily, source: str | None) -> bool:
    try:
        return bool(family.claims(source))
    except PrunebenchError:
        raise
    except Exception as err:  # noqa: BLE001 - a plugin's bug, named as such in one line
        raise PluginError(f"model family {family.name!r}: claims({source!r}) raised "
                          f"{type(err).__name__}: {err}") from err


def _check_loaded(family: ModelFamily, model, info) -> None:
    """What a family's ``load`` returned has every VLAModel member and the info results need."""
    missing = missing_members(model)  # not isinstance: Python >= 3.12 misses nn.Module submodules
    if missing:
        raise PluginError(f"model family {family.name!r} returned a {type(model).__name__}, which "
                          f"lacks {', '.join(missing)} of prunebench.VLAModel")
    if not isinstance(info, dict) or not isinstance(info.get("source"), str) or "trained" not in info:
        raise PluginError(f"model family {family.name!r}: load must return (model, info) with info "
                          "a dict holding 'source' (str) and 'trained' (bool)")


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
