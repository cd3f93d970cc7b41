"""Hook specifications of prunebench (pluggy project name ``prunebench``).

A plugin is a module with ``@prunebench.hookimpl`` functions, installed as a distribution that
declares it under the ``prunebench`` entry-point group::

    [project.entry-points.prunebench]
    my_strategy = "my_package.my_module"

Built-in strategies (``strategies/``) register through exactly the same hook, and the built-in
models (MiniOFT, OpenVLA-OFT: ``prunebench.models.builtin``) through ``prunebench_register_models``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.contract.model import ModelFamily
    from prunebench.contract.strategy import Strategy

NAME = "prunebench"
hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)

__all__ = ["hookimpl", "hookspec", "prunebench_register_strategies", "prunebench_register_models"]


@hookspec
def prunebench_register_strategies(register: Callable[[type["Strategy"]], None]) -> None:
    """Register token-selection strategies: call ``register(StrategyClass)`` once per strategy.

    The class must subclass :class:`prunebench.Strategy`, set a unique ``name`` and a pydantic
    ``Config`` (subclass of :class:`prunebench.StrategyConfig`).

    .. versionadded:: 0.1
    """


@hookspec
def prunebench_register_models() -> list["ModelFamily"]:
    """Register model families: return a list of :class:`prunebench.ModelFamily`.

    A family says whether it loads a ``--model`` source (``claims(source)``: a path or hub id, None
    when no ``--model`` is given) and loads it (``load(source, *, seed, suite, device)`` returning
    a :class:`prunebench.VLAModel` and an info dict with ``source`` and ``trained``).
    ``load_model`` asks plugins' families before the built-in ones, so a plugin may claim any
    source; family names must be unique.

    .. versionadded:: 0.1
    """
