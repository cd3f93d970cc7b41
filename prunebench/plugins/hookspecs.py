"""Hook specifications of prunebench (pluggy project name ``prunebench``).

A plugin is a module with ``@prunebench.hookimpl`` functions, installed as a distribution that
declares it under the ``prunebench`` entry-point group::

    [project.entry-points.prunebench]
    my_strategy = "my_package.my_module"

Built-in strategies (``strategies/``) register through exactly the same hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.contract.interface import Strategy

NAME = "prunebench"
hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)

__all__ = ["hookimpl", "hookspec", "prunebench_register_strategies"]


@hookspec
def prunebench_register_strategies(register: Callable[[type["Strategy"]], None]) -> None:
    """Register token-selection strategies: call ``register(StrategyClass)`` once per strategy.

    The class must subclass :class:`prunebench.Strategy`, set a unique ``name`` and a pydantic
    ``Config`` (subclass of :class:`prunebench.StrategyConfig`).

    .. versionadded:: 0.1
    """
