"""One plugin manager: built-ins, entry-point and ``--plugin`` plugins, one registry, clear errors.

Environment variables:

* ``PRUNEBENCH_LOAD_PLUGINS``: comma list of distribution names whose entry points to load
  (empty string: load none); unset: load every installed ``prunebench`` entry point.
* ``PRUNEBENCH_DISABLED_PLUGINS``: comma list of plugin (entry-point) names to block.
* ``PRUNEBENCH_PLUGIN_FILES``: ``os.pathsep``-separated plugins to register that no distribution
  installs: paths of ``.py`` files or importable module names. The CLI's ``--plugin`` sets it for
  the duration of a command, so the worker processes it starts load the same plugins.

An entry-point plugin that fails to import is skipped with one warning (``prunebench plugins``
lists it as broken, with the reason); only asking for a strategy it may have provided is an error.
A ``--plugin`` file or module was asked for by name: one that is missing, fails to import or
implements no hook is an error (``PluginError``, one line).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import pluggy

from prunebench.contract.errors import PluginError
from prunebench.contract.strategy import Strategy, StrategyConfig
from prunebench.plugins import hookspecs
from prunebench.plugins.dense import DENSE, Dense

DEFAULT_PLUGINS = (
    "prunebench.strategies.random",
    "prunebench.strategies.downsample",
    "prunebench.strategies.fastv",
    "prunebench.strategies.specprune_vla",
    "prunebench.strategies.vla_pruner",
    "prunebench.strategies.adp",
    "prunebench.strategies.divprune",
    "prunebench.strategies.lightvla_free",
    "prunebench.strategies.sparsevlm",
    "prunebench.strategies.vla_cache",
    "prunebench.strategies.tome",
    "prunebench.models.builtin",  # the built-in model families (MiniOFT, OpenVLA-OFT)
)
PLUGIN_FILES = "PRUNEBENCH_PLUGIN_FILES"


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
        self._sources: dict[str, str] = {}  # plugin name -> "file" or "module": given by --plugin

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Register built-ins, entry points and ``PRUNEBENCH_PLUGIN_FILES`` once; idempotent."""
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
        for spec in plugin_specs():
            self.load_plugin(spec)

    def load_plugin(self, spec: str) -> str:
        """Register the plugin in a ``.py`` file (a path) or an importable module (a name), as
        ``--plugin`` does, and return its plugin name: the file's absolute path, or the module name.

        Idempotent. A file is imported under a module name of its own, derived from its path (the
        same in every process). A missing file, an import that raises and a module that implements
        no hook are ``PluginError``s that name ``spec``.
        """
        self.load()
        spec = str(spec)
        is_file = _is_file_spec(spec)
        name = os.path.abspath(spec) if is_file else spec
        if self.pm.get_plugin(name) is not None or self.pm.is_blocked(name):
            return name
        plugin = _import_file(spec, name) if is_file else _import_module(spec)
        self.register(plugin, name=name)
        if not self.pm.get_hookcallers(plugin):
            self.unregister(name)
            raise PluginError(f"plugin {spec!r} implements no prunebench hook (expected "
                              "@prunebench.hookimpl def prunebench_register_strategies(register), or "
                              "prunebench_register_models())")
        self._sources[name] = "file" if is_file else "module"
        return name

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
        """Names of the strategies shipped with prunebench (``prunebench.strategies``), dense excluded."""
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

        from prunebench.runtime.inputs import one_line

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
            source = self._sources.get(name)  # --plugin: a file or module that no distribution names
            rows.append({
                "name": name,
                "version": dist.version if dist else None if source else own,
                "distribution": dist.metadata["Name"] if dist else None if source else "prunebench",
                "builtin": name in self._builtin,
                "hooks": sorted(h.name for h in self.pm.get_hookcallers(plugin) or []),
                "strategies": sorted(s for s, r in strategies.items() if r.plugin == name),
                **({"source": source} if source else {}),
            })
        return sorted(rows, key=lambda r: (not r["builtin"], r["name"]))


def plugin_specs() -> list[str]:
    """The plugins listed in ``PRUNEBENCH_PLUGIN_FILES``, in order."""
    return [s for s in os.environ.get(PLUGIN_FILES, "").split(os.pathsep) if s.strip()]


def add_plugins(specs: list[str]) -> None:
    """``specs`` registered in ``MANAGER`` and added to ``PRUNEBENCH_PLUGIN_FILES`` (files as absolute
    paths), so that worker processes started from now on register them too (a study definition's
    ``plugins``). A strategy name they clash on is reported here, before any work."""
    if not specs:
        return
    names = [MANAGER.load_plugin(spec) for spec in specs]  # errors name each spec as given
    MANAGER.strategies()
    listed = plugin_specs()
    os.environ[PLUGIN_FILES] = os.pathsep.join(listed + [n for n in names if n not in listed])


@contextmanager
def using_plugins(specs: list[str] | None):
    """``--plugin``: ``specs`` registered in ``MANAGER`` and added to ``PRUNEBENCH_PLUGIN_FILES``
    (files as absolute paths) for the duration of the block, so that the worker processes started
    in it register them too. A strategy name they clash on is reported here, before any work."""
    if not specs:
        yield
        return
    before = os.environ.get(PLUGIN_FILES)
    add_plugins(specs)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PLUGIN_FILES, None)
        else:
            os.environ[PLUGIN_FILES] = before


def _is_file_spec(spec: str) -> bool:
    """A path (``mine.py``, ``plugins/mine``) rather than a module name (``my_package.mine``)."""
    return spec.endswith(".py") or os.sep in spec or bool(os.altsep and os.altsep in spec) or \
        os.path.isfile(spec)


def _import_file(spec: str, path: str):
    """Import the file at ``path`` as a module named after it, e.g. ``prunebench_plugin_mine_1a2b3c4d``."""
    if not os.path.exists(path):
        raise PluginError(f"plugin {spec!r}: no such file")
    if not os.path.isfile(path):
        raise PluginError(f"plugin {spec!r}: not a file (give a .py file or a module name)")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_name = f"prunebench_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(f"plugin {spec!r}: cannot be imported as Python (give a .py file)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before running it: dataclasses, pickle and the like look it up
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - one line that names the plugin, not a traceback
        sys.modules.pop(module_name, None)
        raise PluginError(f"plugin {spec!r} failed to import: {_one_line(err)}") from None
    return module


def _import_module(spec: str):
    try:
        return importlib.import_module(spec)
    except Exception as err:  # noqa: BLE001 - one line that names the plugin, not a traceback
        raise PluginError(f"plugin {spec!r} failed to import: {_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}"


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
