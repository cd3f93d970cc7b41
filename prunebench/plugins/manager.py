"""One plugin manager: built-in strategies and entry-point plugins, one registry, clear errors.

Environment variables:

* ``PRUNEBENCH_LOAD_PLUGINS``: comma list of distribution names whose entry points to load
  (empty string: load none); unset: load every installed ``prunebench`` entry point.
* ``PRUNEBENCH_DISABLED_PLUGINS``: comma list of plugin (entry-point) names to block.

A plugin that fails to import is skipped with one warning (``prunebench plugins`` lists it as
broken, with the reason); only asking for a strategy it may have provided is an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass

import pluggy

from prunebench.plugins import hookspecs
from prunebench.plugins.dense import DENSE, Dense
from prunebench.contract.errors import PluginError
from prunebench.contract.interface import Strategy, StrategyConfig

DEFAULT_PLUGINS = (
    "prunebench.strategies.random",
    "prunebench.strategies.downsample",
    "prunebench.strategies.fastv",
    "prunebench.strategies.specprune_vla",
    "prunebench.strategies.vla_pruner",
    "prunebench.strategies.adp",
)


@dataclass
class RegisteredStrategy:
    cls: type[Strategy]
    plugin: str  # name of the plugin that registered it


class PluginManager:
    """Wraps ``pluggy.PluginManager``; builds the strategy registry from the registration hook."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.NAME)
        self.pm.add_hookspecs(hookspecs)
        self._loaded = False
        self._strategies: dict[str, RegisteredStrategy] | None = None
        self._builtin: set[str] = set()
        self._dists: dict[str, md.Distribution] = {}
        self.broken: dict[str, str] = {}  # plugin name -> why it failed to import

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Register built-ins and entry points once; idempotent."""
        if self._loaded:
            return
        self._loaded = True
        for module_name in DEFAULT_PLUGINS:
            self.register(importlib.import_module(module_name), name=module_name)
            self._builtin.add(module_name)
        for name in filter(None, os.environ.get("PRUNEBENCH_DISABLED_PLUGINS", "").split(",")):
            self.pm.set_blocked(name.strip())
        allow = os.environ.get("PRUNEBENCH_LOAD_PLUGINS")
        if allow is None:
            self._load_entry_points()
        else:
            for dist in filter(None, (d.strip() for d in allow.split(","))):
                self._load_entry_points(dist)
        for name, reason in self.broken.items():
            print(f"warning: plugin {name!r} skipped: {reason} (to skip it silently, add it to "
                  "PRUNEBENCH_DISABLED_PLUGINS)", file=sys.stderr)

    def _load_entry_points(self, distribution: str | None = None) -> None:
        for dist in md.distributions():
            if distribution is not None and dist.metadata["Name"] != distribution:
                continue
            for ep in dist.entry_points:
                if ep.group != hookspecs.NAME or self.pm.is_registered(ep.name) or \
                        self.pm.is_blocked(ep.name) or self.pm.get_plugin(ep.name) is not None:
                    continue
                try:
                    plugin = ep.load()
                except Exception as err:  # noqa: BLE001 - a broken plugin must not block the others
                    self.broken[ep.name] = (f"{dist.metadata['Name']} {dist.version} failed to import: "
                                            f"{type(err).__name__}: {err}")
                    continue
                self.register(plugin, name=ep.name, dist=dist)

    def register(self, plugin, name: str, dist=None) -> None:
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except ValueError as err:  # duplicate plugin name
            raise PluginError(f"plugin {name!r}: {err}") from err
        except pluggy.PluginValidationError as err:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            raise PluginError(f"plugin {name!r}: {err} (misspelled hook? known hooks: "
                              f"{', '.join(hookspecs.__all__[2:])})") from err
        if dist is not None:
            self._dists[name] = dist
        self._strategies = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._strategies = None

    # ------------------------------------------------------------------ registry
    def strategies(self) -> dict[str, RegisteredStrategy]:
        """Name -> strategy class, from every plugin's registration hook."""
        self.load()
        if self._strategies is not None:
            return self._strategies
        registry = {DENSE: RegisteredStrategy(Dense, "prunebench")}  # core: no plugin can remove it
        for impl in self.pm.hook.prunebench_register_strategies.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(cls, _plugin=plugin_name):
                _check_strategy_class(cls, _plugin)
                if cls.name in registry:
                    raise PluginError(f"strategy name {cls.name!r} is registered twice: by plugin "
                                      f"{registry[cls.name].plugin!r} and by plugin {_plugin!r}")
                registry[cls.name] = RegisteredStrategy(cls, _plugin)

            impl.function(register=register)
        self._strategies = dict(sorted(registry.items()))
        return self._strategies

    def builtin_strategies(self) -> list[str]:
        """Names of the strategies shipped with prunebench (package ``strategies``), dense excluded."""
        return [n for n, r in self.strategies().items() if r.plugin in self._builtin]

    def get(self, name: str) -> type[Strategy]:
        strategies = self.strategies()
        if name not in strategies:
            broken = "".join(f"; plugin {p!r}, which may provide it, was skipped: {why}"
                             for p, why in self.broken.items())
            raise PluginError(f"unknown strategy {name!r}; installed: {', '.join(strategies)}{broken}")
        return strategies[name].cls

    def create(self, name: str, config: dict | None = None) -> Strategy:
        """Instantiate a strategy with a config dict, validated by its pydantic Config."""
        from pydantic import ValidationError

        from prunebench.evaluation.config import one_line

        cls = self.get(name)
        try:
            return cls(cls.Config(**(config or {})))
        except ValidationError as err:
            raise PluginError(one_line(err, f"strategy {name!r}: config ")) from None

    def plugins(self) -> list[dict]:
        """Name, version, hooks and strategies of every registered plugin."""
        strategies = self.strategies()
        own = md.version("prunebench") if _installed("prunebench") else "dev"
        rows = [{"name": "prunebench", "version": own, "distribution": "prunebench", "builtin": True,
                 "hooks": [], "strategies": [DENSE]}]  # the core's dense baseline
        rows += [{"name": name, "version": "", "distribution": "", "builtin": False, "hooks": [],
                  "strategies": [], "broken": why} for name, why in self.broken.items()]
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist = self._dists.get(name)
            rows.append({
                "name": name,
                "version": dist.version if dist else own,
                "distribution": dist.metadata["Name"] if dist else "prunebench",
                "builtin": name in self._builtin,
                "hooks": sorted(h.name for h in self.pm.get_hookcallers(plugin) or []),
                "strategies": sorted(s for s, r in strategies.items() if r.plugin == name),
            })
        return sorted(rows, key=lambda r: (not r["builtin"], r["name"]))


def _installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def _check_strategy_class(cls, plugin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a prunebench.Strategy "
                          "subclass")
    if not cls.name or not isinstance(cls.name, str):
        raise PluginError(f"plugin {plugin!r}: strategy class {cls.__name__} has no name")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, StrategyConfig)):
        raise PluginError(f"plugin {plugin!r}: strategy {cls.name!r} needs a Config subclassing "
                          "prunebench.StrategyConfig")
    if cls.position_ids not in ("original", "recompact"):
        raise PluginError(f"plugin {plugin!r}: strategy {cls.name!r} position_ids must be "
                          "'original' or 'recompact'")


MANAGER = PluginManager()
