"""Run configuration files (YAML or JSON), validated by pydantic with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prunebench.errors import PrunebenchError


class RunConfig(BaseModel):
    """``strategy``: a registered name; ``config``: that strategy's Config fields."""

    model_config = ConfigDict(extra="forbid")
    strategy: str
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    # MiniOFT safetensors file, or an OpenVLA-OFT checkpoint directory / hub id; None = the built-in model
    model: str | None = None
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")  # where the model runs
    # torch threads of each process that measures; None = the cores / the processes measuring at once
    threads: int | None = Field(None, ge=1)


def one_line(err: ValidationError, prefix: str = "", field_prefix: str = "") -> str:
    """The most telling error as one line; an unknown field (often a typo) comes first.
    ``field_prefix`` names where the validated dict sits inside a larger file (``a.b.``)."""
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    field = field_prefix + ".".join(str(p) for p in first["loc"]) or "(root)"
    message = ("unknown field (typo?)" if first["type"] == "extra_forbidden"
               else first["msg"].removeprefix("Value error, "))
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{prefix}field {field!r}: {message}{more}"


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["keep_ratio=0.25", "rows=text"]`` -> ``{"keep_ratio": 0.25, "rows": "text"}`` (JSON values
    where they parse, strings otherwise)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise PrunebenchError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON file, with a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PrunebenchError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else \
            json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise PrunebenchError(f"{path}: not valid {path.suffix[1:].upper()}: "
                              f"{str(err).splitlines()[0]}") from None
    if not isinstance(data or {}, dict):
        raise PrunebenchError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    return data or {}


def load_config(cls: type[BaseModel], path: str | Path | None = None, **fields: Any):
    """``cls`` from a YAML/JSON file and/or fields (fields that are not None win), one-line errors."""
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in fields.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PrunebenchError(one_line(err, f"{path}: " if path else "")) from None


def load_run_config(path: str | Path) -> RunConfig:
    return load_config(RunConfig, path)
