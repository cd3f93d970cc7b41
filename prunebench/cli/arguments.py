"""Argument helpers shared by the command modules: the parser class, argparse types, common flags,
and the engine the measuring commands build."""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line, like every other bad input (exit status 2); the usage is one -h away."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} -h')\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


positive_int = _int_at_least(1)  # argparse types: counts ...
non_negative_int = _int_at_least(0)  # ... and seeds


def device_arg(text: str) -> str:
    """argparse type: a device in one of the forms prunebench knows (config.parse_device)."""
    from prunebench.evaluation.config import parse_device

    try:
        return parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_model_arguments(p) -> None:
    p.add_argument("--model", help="MiniOFT safetensors file, or an OpenVLA-OFT checkpoint directory or hub "
                                   "id (default: the built-in model)")
    p.add_argument("--device", type=device_arg,
                   help="cpu (default) or cuda[:N]; OpenVLA-OFT runs in bfloat16 on cuda")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch threads of each process that measures (default: the cores / the "
                        "processes running at once)")


def add_plugin_argument(p) -> None:
    """``--plugin``, on every command that lists or resolves a strategy (main() loads them)."""
    p.add_argument("--plugin", action="append", metavar="PATH_OR_MODULE",
                   help="register a strategy plugin from a .py file or an importable module, without "
                        "packaging it (repeatable; worker processes load it too)")


def build_engine(model_path, seed, device=None, suite=None, threads=None):
    """The pruning engine on a loaded model, for the commands that measure (run, replay, compare)."""
    from prunebench.engine.loop import PruningEngine
    from prunebench.evaluation.contention import set_threads
    from prunebench.models import load_model

    set_threads(threads)  # this process measures: its torch threads (default: every core) are set
    model, info = load_model(model_path, seed=seed, suite=suite, device=device or "cpu")
    if not info["trained"]:
        print("note: no trained weights found; using a randomly initialised built-in model",
              file=sys.stderr)
    return PruningEngine(model), info
