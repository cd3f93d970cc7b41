"""Input files and command-line values: YAML/JSON files, ``--set`` overrides and pydantic
validation, each failure as one line naming the file, field or flag at fault."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from prunebench.contract.errors import PrunebenchError


def one_line(err: ValidationError, prefix: str = "", field_prefix: str = "",
             flags: set[str] | None = None) -> str:
    """The most telling error as one line; an unknown field (often a typo) comes first.
    ``field_prefix`` names where the validated dict sits inside a larger file (``a.b.``); a field in
    ``flags`` came from the command line and is named with its flag too (``--camera-size``)."""
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    field = field_prefix + ".".join(str(p) for p in first["loc"]) or "(root)"
    message = ("unknown field (typo?)" if first["type"] == "extra_forbidden"
               else first["msg"].removeprefix("Value error, "))
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["loc"] and first["loc"][0] in (flags or ()):  # not from the file: no file prefix
        return f"field {field!r} (--{str(first['loc'][0]).replace('_', '-')}): {message}{more}"
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


def parse_file(path: Path) -> Any:
    """The data in a YAML (.yaml/.yml) or JSON file (any other name), or one line naming the file,
    and the line of a syntax error."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise PrunebenchError(f"{path} cannot be read ({err})") from None
    try:
        return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as err:
        raise PrunebenchError(f"{path}, line {err.lineno}: not valid JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""  # marks count lines from 0
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PrunebenchError(f"{path}{where}: not valid YAML: {problem}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON file, with a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PrunebenchError(f"config file {path} is not a file" if path.exists() else
                              f"config file not found: {path}")
    data = parse_file(path)
    if not isinstance(data or {}, dict):
        raise PrunebenchError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    return data or {}


def load_config(cls: type[BaseModel], path: str | Path | None = None, **fields: Any):
    """``cls`` from a YAML/JSON file and/or fields (fields that are not None win), one-line errors."""
    data = read_config_file(path) if path else {}
    flags = {k: v for k, v in fields.items() if v is not None}
    data.update(flags)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PrunebenchError(one_line(err, f"{path}: " if path else "", flags=set(flags))) from None
