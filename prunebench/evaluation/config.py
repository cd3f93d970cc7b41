"""The run configuration every evaluation shares (strategy, config, seed, model, device, threads);
files are read and validated by :mod:`prunebench.runtime.inputs`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from prunebench.runtime.inputs import load_config


def parse_device(device: str) -> str:
    """``device`` when it is one of the forms prunebench runs on (cpu, cuda, cuda:N), else ValueError;
    whether this machine has that device is checked when the model loads (models.check_device)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"expected cpu, cuda or cuda:N (N a CUDA device index), got {device!r}")
    return device


Device = Annotated[str, AfterValidator(parse_device)]
"""A config field holding a device (``device: Device = "cpu"``)."""


class RunConfig(BaseModel):
    """``strategy``: a registered name; ``config``: that strategy's Config fields."""

    model_config = ConfigDict(extra="forbid")
    strategy: str
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    # MiniOFT safetensors file, or an OpenVLA-OFT checkpoint directory / hub id; None = the built-in model
    model: str | None = None
    device: Device = "cpu"  # where the model runs
    # torch threads of each process that measures; None = the cores / the processes measuring at once
    threads: int | None = Field(None, ge=1)


def load_run_config(path: str | Path) -> RunConfig:
    return load_config(RunConfig, path)
