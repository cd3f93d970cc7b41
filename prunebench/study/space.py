"""Search spaces: a strategy's own ``Config.search_space`` run under a study's narrowed ranges and held
parameters, so that every config a trial can be given is known, and validated, before the study starts.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from prunebench.runtime.inputs import one_line

if TYPE_CHECKING:
    import optuna

    from prunebench.study.definition import StrategySearch


class SearchTrial:
    """What a strategy's ``search_space`` sees: an Optuna trial with the study's narrowed ranges
    (``space``) and held parameters (``fixed``), and ``n_layers``, the depth of the study's model, so
    layer ranges fit a 4-layer and a 32-layer model alike. Without a trial it records the parameters
    instead."""

    def __init__(self, trial: optuna.Trial | None, space: dict[str, list], fixed: dict[str, Any],
                 n_layers: int | None = None) -> None:
        self.trial, self.space, self.fixed = trial, space, fixed
        self.n_layers = n_layers if n_layers is not None else model_depth(None)  # the built-in model
        self.seen: dict[str, tuple[str, Any]] = {}  # parameter -> (kind, range or choices)

    def _suggest(self, kind: str, name: str, bounds, **kw):
        bounds = list(self.space.get(name, bounds))
        self.seen[name] = (kind, bounds)
        if name in self.fixed:
            return self.fixed[name]
        if self.trial is None:
            return bounds[0]
        if kind == "categorical":
            return self.trial.suggest_categorical(name, bounds)
        suggest = self.trial.suggest_float if kind == "float" else self.trial.suggest_int
        return suggest(name, bounds[0], bounds[1], **kw)

    def suggest_float(self, name: str, low: float, high: float, **kw) -> float:
        return self._suggest("float", name, (low, high), **kw)

    def suggest_int(self, name: str, low: int, high: int, **kw) -> int:
        return self._suggest("int", name, (low, high), **kw)

    def suggest_categorical(self, name: str, choices):
        return self._suggest("categorical", name, tuple(choices))


@functools.lru_cache(maxsize=8)
def model_depth(source: str | None) -> int:
    """Decoder layers of a study's model (``evaluation.model``; None: the built-in one), read once."""
    from prunebench.models import model_depth as depth

    return depth(source)


def parameters(strategy: str, n_layers: int | None = None) -> dict[str, tuple[str, list]]:
    """The parameters a strategy's search space suggests on a model of ``n_layers`` layers (None:
    the built-in model): name -> (kind, range or choices)."""
    from prunebench.plugins.manager import MANAGER

    recorder = SearchTrial(None, {}, {}, n_layers)
    MANAGER.get(strategy).Config.search_space(recorder)
    return recorder.seen


def check_search(name: str, search: StrategySearch, n_layers: int | None = None) -> None:
    """A strategy's ``config``, ``space``, ``fixed`` and ``enqueue`` against its Config and search
    space (a ValueError naming the field at fault)."""
    from prunebench.plugins.manager import MANAGER

    cls = MANAGER.get(name).Config
    try:
        cls(**search.config)
    except ValidationError as err:
        raise ValueError(one_line(err, field_prefix=f"{name}.config.")) from None
    known = parameters(name, n_layers)
    for field in ("space", "fixed"):
        for param in getattr(search, field):
            if param not in known:
                raise ValueError(f"{name}.{field}: {param!r} is not a parameter of {name}'s search "
                                 f"space ({', '.join(known) or 'none'})")
    for param, bounds in search.space.items():
        kind = known[param][0]
        if kind != "categorical" and (len(bounds) != 2 or bounds[0] > bounds[1]):
            raise ValueError(f"{name}.space.{param}: give [low, high]")
    # every value a trial can be given must make a valid config: now, not in a worker mid-study
    for param, bounds in search.space.items():
        for value in bounds if known[param][0] == "categorical" else bounds[:2]:
            _check_values(name, search, {param: value}, f"{name}.space.", n_layers)
    if search.fixed:
        _check_values(name, search, {}, f"{name}.fixed.", n_layers)
    for i, params in enumerate(search.enqueue):
        where = f"{name}.enqueue[{i}]"
        for param, value in params.items():
            if param not in known or param in search.fixed:
                raise ValueError(f"{where}: {param!r} is not a searched parameter of {name} "
                                 f"({', '.join(p for p in known if p not in search.fixed) or 'none'})")
            kind, bounds = known[param][0], search.space.get(param, known[param][1])
            inside = value in bounds if kind == "categorical" else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1])
            if not inside:
                raise ValueError(f"{where}.{param}: {value!r} is outside the search space "
                                 f"({list(bounds) if kind == 'categorical' else f'[{bounds[0]}, {bounds[1]}]'})")
        _check_values(name, search, params, f"{where}.", n_layers)


def _check_values(name: str, search: StrategySearch, params: dict[str, Any], where: str,
                  n_layers: int | None) -> None:
    """The config a trial with ``params`` (and the held ones) gets must validate."""
    try:
        strategy_config(name, search, params=params, n_layers=n_layers)
    except ValidationError as err:
        raise ValueError(one_line(err, field_prefix=where)) from None


def strategy_config(strategy: str, search: StrategySearch, trial: optuna.Trial | None = None,
                    params: dict[str, Any] | None = None, n_layers: int | None = None):
    """The strategy's Config for a trial: its search space, narrowed, plus the held config fields.
    No trial: the defaults; or, given ``params``, those values (the rest at their low end)."""
    from prunebench.plugins.manager import MANAGER

    cls = MANAGER.get(strategy).Config
    if trial is not None or params is not None:
        proposed = cls.search_space(SearchTrial(trial, search.space, {**search.fixed, **(params or {})},
                                                   n_layers))
    else:
        proposed = cls()
    return cls(**{**proposed.model_dump(), **search.config})


def default_params(strategy: str, search: StrategySearch, n_layers: int | None = None) -> dict[str, Any]:
    """The paper defaults as trial parameters: a parameter named like a config field, in range."""
    from prunebench.plugins.manager import MANAGER

    defaults = MANAGER.get(strategy).Config().model_dump()
    out = {}
    for name, (kind, bounds) in parameters(strategy, n_layers).items():
        bounds = search.space.get(name, bounds)
        value = defaults.get(name)
        if name in search.fixed or value is None:
            continue
        if (kind == "categorical" and value in bounds) or (
                kind != "categorical" and not isinstance(value, (bool, str, tuple, list))
                and bounds[0] <= value <= bounds[1]):
            out[name] = value
    return out
