"""Optuna studies: multi-objective searches over strategy configs, for accuracy-latency Pareto fronts.

A study definition (YAML/JSON, :class:`StudyDefinition`) names the strategies, how one trial is
evaluated (closed-loop LIBERO, replay of recorded streams, or a synthetic stream for smoke tests),
the objectives, constraints, sampler and seed. Every strategy gets its own Optuna study
``<name>/<strategy>`` in one storage, plus ``<name>/none``: the dense baseline, one trial, run first.
A strategy's own ``Config.search_space(trial)`` proposes its configs; the definition can narrow a
parameter's range (``space``), hold it at a value (``fixed``), hold config fields (``config``) and
add parameter sets to evaluate first (``enqueue``, after the paper defaults).

Storage (an existing engine, not ours): ``sqlite:///file.db`` (default, resumable), ``journal:file``
(Optuna's journal file: several processes on one host), ``postgresql://...`` (several machines).
RDB storages run a heartbeat: a trial whose worker died (SIGKILL, lost machine) is marked FAIL after
``grace_s`` and retried, as is a trial that raised. Several workers can run ``study run`` on one
definition at once; each stops when its strategy has ``trials`` complete trials (a trial that two
workers start at the same moment beyond the count is dropped as PRUNED, ``surplus``). A parameter set already evaluated is not evaluated again:
the trial reuses the earlier measurement (``duplicate_of``).

Each trial's full results file lands in ``<results_dir>/<strategy>/<name>_trial_<n>.json``; the trial's
user attributes hold its metrics (see :data:`METRICS`), config, worker and results path.
:mod:`prunebench.study.guard` keeps the stored results true: a study's identity, its folder, its
storage file, dead workers' trials, interrupts.
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import optuna
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunebench.plugins.dense import DENSE, Dense
from prunebench.evaluation.config import load_config, one_line
from prunebench.contract.errors import PrunebenchError, RunAborted
from prunebench.study.guard import (Interrupts, check_identity, check_storage_file, check_unknown_trial_files,
                                    claim_results_dir, no_parent_steps, storage_file, trial_file, worker_gone,
                                    worker_id)

MODES = ("closed_loop", "replay", "synthetic")
# objective -> (direction, evaluation modes that measure it, meaning)
OBJECTIVES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "success_rate": ("maximize", ("closed_loop",), "closed-loop success rate"),
    "latency_ms": ("minimize", MODES, "median query latency, ms (scoring and pruning included)"),
    "speedup": ("maximize", MODES, "median dense / median pruned query time, same process"),
    "action_error": ("minimize", MODES, "mean |a - a_dense| per query, normalised actions"),
    "gflops": ("minimize", MODES, "mean LLM GFLOPs per query"),
}
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"  # a trial's error: retried without a message
MEASURED_AGAINST_DENSE = ("speedup", "action_error")  # need the dense forward on every query
METRICS = ("success_rate", "success_ci95", "n_episodes", "n_errors", "latency_ms", "speedup", "action_error",
           "gflops", "visual_tokens", "keep_ratio", "latency_breakdown_ms",
           "contended", "threads", "device")  # how the latency was measured (prunebench.evaluation.contention)


# --------------------------------------------------------------------------- definition
class Evaluation(BaseModel):
    """How one trial is measured. The init states, episodes and seeds are the same for every trial."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["closed_loop", "replay", "synthetic"] = "closed_loop"
    model: str | None = None  # MiniOFT weights or an OpenVLA-OFT checkpoint; None = the built-in model
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    # torch threads of each process that measures; None = the cores / the processes measuring at once
    threads: int | None = Field(None, ge=1)
    # closed_loop: EvalConfig fields (suite, tasks, episodes, first_init_state, render_quality, ...)
    closed_loop: dict[str, Any] = Field(default_factory=dict)
    streams: list[str] = Field(default_factory=list)  # replay: stream files or directories
    queries: int = Field(16, ge=1)  # synthetic: queries per trial (smoke tests, no simulator)

    @model_validator(mode="after")
    def _check(self) -> "Evaluation":
        if self.mode == "replay" and not self.streams:
            raise ValueError("mode replay needs streams (record them with prunebench run --record-streams DIR)")
        if self.closed_loop:
            self.eval_config(DENSE, {}, 0)  # validates the fields now, not at the first trial
        return self

    def eval_config(self, strategy: str, config: dict, seed: int):
        from prunebench.evaluation.closed_loop import EvalConfig

        taken = {"strategy", "config", "seed", "model", "device", "threads"} & set(self.closed_loop)
        if taken:
            raise ValueError(f"closed_loop.{sorted(taken)[0]} is set by the study, not here")
        try:
            return EvalConfig(strategy=strategy, config=config, seed=seed, model=self.model, device=self.device,
                              threads=self.threads, **self.closed_loop)
        except ValidationError as err:
            raise ValueError(one_line(err, field_prefix="closed_loop.")) from None


class StrategySearch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trials: int | None = Field(None, ge=1)  # complete trials wanted; None = the study's ``trials``
    config: dict[str, Any] = Field(default_factory=dict)  # config fields held fixed, not searched
    space: dict[str, list] = Field(default_factory=dict)  # parameter -> [low, high] or choices
    fixed: dict[str, Any] = Field(default_factory=dict)  # parameter -> value, not searched
    enqueue: list[dict[str, Any]] = Field(default_factory=list)  # parameter sets evaluated first


class Constraints(BaseModel):
    """Feasibility of a trial (Optuna's ``trial.set_constraint``: a value <= 0 is feasible)."""

    model_config = ConfigDict(extra="forbid")
    max_success_drop: float | None = Field(None, ge=0, le=1)  # vs the dense baseline, as a fraction
    max_action_error: float | None = Field(None, ge=0)


class ValidateFront(BaseModel):
    """Multi-fidelity: after the search, evaluate each strategy's front in closed loop."""

    model_config = ConfigDict(extra="forbid")
    closed_loop: dict[str, Any] = Field(default_factory=dict)  # EvalConfig fields, as in Evaluation


class StudyDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    storage: str | None = None  # default sqlite:///<results_dir>/study.db
    results_dir: str | None = None  # default results/studies/<name>
    strategies: dict[str, StrategySearch]
    trials: int = Field(20, ge=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    objectives: list[str] = Field(default_factory=lambda: ["success_rate", "latency_ms"], min_length=1)
    constraints: Constraints = Field(default_factory=Constraints)
    sampler: Literal["tpe", "nsga2", "gp"] = "tpe"
    sampler_options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the sampler
    seed: int = 0
    heartbeat_s: int = Field(30, ge=1)  # RDB storages: a live trial's heartbeat period
    grace_s: int = Field(120, ge=2)  # ... and how long without one before it counts as dead
    max_retry: int = Field(2, ge=0)  # retries of a failed or dead trial
    poll_s: float = Field(2.0, gt=0)  # a worker waiting for another's trials checks this often
    validate_front: ValidateFront | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:  # it names folders and files: no '/', no '..'
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError(f"{value!r} is not a plain name (letters, digits, _ . -; starting with a "
                             "letter or digit)")
        return value

    @field_validator("results_dir")
    @classmethod
    def _results_dir_inside(cls, value: str | None) -> str | None:
        no_parent_steps(value)
        return value

    @field_validator("storage")
    @classmethod
    def _storage_file_inside(cls, value: str | None) -> str | None:
        no_parent_steps(str(storage_file(value or "") or ""))
        return value

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, value: dict[str, StrategySearch]) -> dict[str, StrategySearch]:
        from prunebench.plugins.manager import MANAGER

        installed = MANAGER.strategies()
        for name, search in value.items():
            if name not in installed:
                raise ValueError(f"{name}: unknown strategy (installed: {', '.join(installed)})")
            _check_search(name, search)
        return value

    @model_validator(mode="after")
    def _check(self) -> "StudyDefinition":
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ValueError(f"objectives: unknown {name!r} (choose from {', '.join(OBJECTIVES)})")
            if self.evaluation.mode not in OBJECTIVES[name][1]:
                raise ValueError(f"objectives: {name} is not measured in mode {self.evaluation.mode}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives has duplicates")
        if self.constraints.max_success_drop is not None and self.evaluation.mode != "closed_loop":
            raise ValueError("constraints.max_success_drop needs evaluation.mode closed_loop")
        needs_dense = [o for o in self.objectives if o in MEASURED_AGAINST_DENSE]
        if self.constraints.max_action_error is not None:
            needs_dense.append("constraints.max_action_error")
        if needs_dense and self.evaluation.mode == "closed_loop" and \
                not self.evaluation.eval_config(DENSE, {}, 0).dense_reference:
            raise ValueError(f"objectives: {needs_dense[0]} is measured against the dense reference, "
                             "which evaluation.closed_loop.dense_reference turns off")
        if self.validate_front is not None:
            Evaluation(mode="closed_loop", closed_loop=self.validate_front.closed_loop)
        return self

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o][0] for o in self.objectives]

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir or f"results/studies/{self.name}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.results_path / 'study.db'}"

    def check_episodes(self) -> None:
        """Closed-loop suite, tasks and init states against the installed LIBERO, before a run starts
        (not on loading: importing LIBERO is slow, and ``show`` does not need it)."""
        from prunebench.evaluation.closed_loop import plan_jobs
        from prunebench.evaluation.libero_env import libero_available

        configs = {}
        if self.evaluation.mode == "closed_loop":
            configs["evaluation.closed_loop"] = self.evaluation.eval_config(DENSE, {}, 0)
        if self.validate_front is not None:
            configs["validate_front.closed_loop"] = Evaluation(
                mode="closed_loop", closed_loop=self.validate_front.closed_loop).eval_config(DENSE, {}, 0)
        if not configs or not libero_available():
            return  # without LIBERO, the first closed-loop trial says so
        for where, cfg in configs.items():
            try:
                plan_jobs(cfg)
            except PrunebenchError as err:
                message = str(err)
                raise PrunebenchError(message.replace("field '", f"field '{where}.", 1) if message.startswith(
                    "field '") else f"field '{where}': {message}") from None

    def searched(self) -> list[str]:
        """Strategy studies in run order: the dense baseline first."""
        return [DENSE] + [s for s in self.strategies if s != DENSE]

    def target(self, strategy: str) -> int:
        if strategy == DENSE:
            return 1
        return self.strategies[strategy].trials or self.trials

    def search(self, strategy: str) -> StrategySearch:
        return self.strategies.get(strategy) or StrategySearch()


def load_study_definition(path: str | Path) -> StudyDefinition:
    """A study definition from YAML/JSON, with a one-line error naming the field at fault."""
    return load_config(StudyDefinition, path)


# --------------------------------------------------------------------------- search spaces
class SearchTrial:
    """What a strategy's ``search_space`` sees: an Optuna trial with the study's narrowed ranges
    (``space``) and held parameters (``fixed``). Without a trial it records the parameters instead."""

    def __init__(self, trial: optuna.Trial | None, space: dict[str, list], fixed: dict[str, Any]) -> None:
        self.trial, self.space, self.fixed = trial, space, fixed
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


def parameters(strategy: str) -> dict[str, tuple[str, list]]:
    """The parameters a strategy's search space suggests: name -> (kind, range or choices)."""
    from prunebench.plugins.manager import MANAGER

    recorder = SearchTrial(None, {}, {})
    MANAGER.get(strategy).Config.search_space(recorder)
    return recorder.seen


def _check_search(name: str, search: StrategySearch) -> None:
    from prunebench.plugins.manager import MANAGER

    cls = MANAGER.get(name).Config
    try:
        cls(**search.config)
    except ValidationError as err:
        raise ValueError(one_line(err, field_prefix=f"{name}.config.")) from None
    known = parameters(name)
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
            _check_values(name, search, {param: value}, f"{name}.space.")
    if search.fixed:
        _check_values(name, search, {}, f"{name}.fixed.")
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
        _check_values(name, search, params, f"{where}.")


def _check_values(name: str, search: StrategySearch, params: dict[str, Any], where: str) -> None:
    """The config a trial with ``params`` (and the held ones) gets must validate."""
    try:
        strategy_config(name, search, params=params)
    except ValidationError as err:
        raise ValueError(one_line(err, field_prefix=where)) from None


def strategy_config(strategy: str, search: StrategySearch, trial: optuna.Trial | None = None,
                    params: dict[str, Any] | None = None):
    """The strategy's Config for a trial: its search space, narrowed, plus the held config fields.
    No trial: the defaults; or, given ``params``, those values (the rest at their low end)."""
    from prunebench.plugins.manager import MANAGER

    cls = MANAGER.get(strategy).Config
    if trial is not None or params is not None:
        proposed = cls.search_space(SearchTrial(trial, search.space, {**search.fixed, **(params or {})}))
    else:
        proposed = cls()
    return cls(**{**proposed.model_dump(), **search.config})


def default_params(strategy: str, search: StrategySearch) -> dict[str, Any]:
    """The paper defaults as trial parameters: a parameter named like a config field, in range."""
    from prunebench.plugins.manager import MANAGER

    defaults = MANAGER.get(strategy).Config().model_dump()
    out = {}
    for name, (kind, bounds) in parameters(strategy).items():
        bounds = search.space.get(name, bounds)
        value = defaults.get(name)
        if name in search.fixed or value is None:
            continue
        if (kind == "categorical" and value in bounds) or (
                kind != "categorical" and not isinstance(value, (bool, str, tuple, list))
                and bounds[0] <= value <= bounds[1]):
            out[name] = value
    return out


# --------------------------------------------------------------------------- storage
def open_storage(defn: StudyDefinition, create: bool = True):
    """Optuna storage for ``defn.storage_url`` (sqlite://, postgresql://, journal:<file>). Without
    ``create``, a storage file that does not exist is an error, not a new empty file."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    url = defn.storage_url
    check_storage_file(defn, create)
    path = storage_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several local workers wait, not fail
    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental; it is what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=defn.heartbeat_s,
                                  grace_period=defn.grace_s,
                                  heartbeat_stale_trial_callback=_Retry(defn.max_retry))
        except ImportError:
            raise PrunebenchError(f"storage {url}: no database driver; pip install 'prunebench[postgres]'") from None
        except Exception as err:  # noqa: BLE001 - a bad URL or unreachable server: one line, not a trace
            if attempt < 2 and "IntegrityError" in type(err).__name__:
                time.sleep(1.0)  # another worker created the tables at the same moment: they exist now
                continue
            raise PrunebenchError(f"storage {url}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def worker_slot(defn: StudyDefinition, storage) -> int:
    """This worker's number among all that ever joined the study (0 for the first). The storage's
    atomic trial numbering in a ``<name>/workers`` registry study is the counter."""
    registry = optuna.create_study(storage=storage, study_name=f"{defn.name}/workers", load_if_exists=True)
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": not a trial
        warnings.simplefilter("ignore", UserWarning)
        trial = registry.ask()
    registry.tell(trial, 0.0)
    return trial.number


def _sampler(defn: StudyDefinition, index: int, slot: int):
    # one random stream per strategy and worker: parallel workers do not propose the same configs,
    # and a lone worker (slot 0) is reproducible from the seed
    seed = defn.seed + 1000 * index + 100_003 * slot
    cls = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
           "gp": optuna.samplers.GPSampler}[defn.sampler]
    try:
        return cls(seed=seed, **defn.sampler_options)
    except TypeError as err:
        raise PrunebenchError(f"sampler_options: {err}") from None


def study_name(defn: StudyDefinition, strategy: str) -> str:
    return f"{defn.name}/{strategy}"


def open_study(defn: StudyDefinition, strategy: str, storage=None, slot: int = 0) -> optuna.Study:
    storage = storage or open_storage(defn)
    study = optuna.create_study(storage=storage, study_name=study_name(defn, strategy),
                                directions=defn.directions, load_if_exists=True,
                                sampler=_sampler(defn, defn.searched().index(strategy), slot))
    check_identity(defn, strategy, study, write=True)
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in defn.directions]:
        raise PrunebenchError(f"study {study.study_name} in {defn.storage_url} has other objectives; "
                              "give the definition another name")
    if study.metric_names != defn.objectives:
        study.set_metric_names(defn.objectives)
    return study


def load_studies(defn: StudyDefinition) -> dict[str, optuna.Study]:
    """The strategy studies that exist in the storage (reading only; nothing is created)."""
    storage = open_storage(defn, create=False)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    studies = {s: optuna.load_study(study_name=study_name(defn, s), storage=storage)
               for s in defn.searched() if study_name(defn, s) in names}
    for strategy, study in studies.items():
        check_identity(defn, strategy, study, write=False)
    return studies


def require_studies(defn: StudyDefinition) -> dict[str, optuna.Study]:
    studies = load_studies(defn)
    if not studies:
        raise PrunebenchError(f"no study {defn.name!r} in {defn.storage_url}; start it with 'prunebench study run'")
    return studies


# --------------------------------------------------------------------------- evaluation
class TrialFailed(Exception):
    """An evaluation error that fails one trial (retried), unlike a usage error, which stops."""

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback


class _NoTrialFailureTraceback(logging.Filter):
    """Optuna logs a failed trial (an interrupted one too) with its whole traceback; the study prints
    one line instead (the traceback is kept in the trial's ``traceback`` user attribute). Nor does
    it say, for each strategy study, that it was created or loaded, or that an enqueued set exists."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return " failed with " not in message and not message.startswith(
            ("A new study created", "Using an existing study", "Trial with params"))


for _name in ("optuna.study._optimize", "optuna.study.study", "optuna.storages._rdb.storage",
              "optuna.storages.journal._storage"):
    optuna.logging.get_logger(_name).addFilter(_NoTrialFailureTraceback())


class Evaluator:
    """Measures one strategy config under the definition's evaluation (one model per process)."""

    def __init__(self, defn: StudyDefinition) -> None:
        from prunebench.evaluation.contention import set_threads
        from prunebench.models import load_model

        self.defn = defn
        evaluation = defn.evaluation
        set_threads(evaluation.threads)  # replays measure in this process (closed loop sets its own)
        self.model, _ = load_model(evaluation.model, seed=defn.seed, suite=evaluation.closed_loop.get("suite"),
                                   device=evaluation.device)
        self.n_visual = self.model.layout_for(1).n_visual
        self._engine = None

    def __call__(self, strategy: str, config: dict, output: Path,
                 closed_loop: dict | None = None) -> dict[str, Any]:
        evaluation = self.defn.evaluation
        if closed_loop is not None or evaluation.mode == "closed_loop":
            if closed_loop is not None:
                evaluation = Evaluation(mode="closed_loop", model=evaluation.model, device=evaluation.device,
                                        threads=evaluation.threads, closed_loop=closed_loop)
            return self._closed_loop(evaluation, strategy, config, output)
        return self._replay(strategy, config, output)

    def _closed_loop(self, evaluation: Evaluation, strategy: str, config: dict, output: Path) -> dict:
        from prunebench.evaluation.closed_loop import evaluate

        cfg = evaluation.eval_config(strategy, config, self.defn.seed)
        results = evaluate(cfg, output, f"prunebench study run ({self.defn.name})")
        overall = results.overall
        q = overall.queries
        return self._metrics(q, success_rate=overall.success_rate, success_ci95=list(overall.success_ci95),
                             n_episodes=overall.n_episodes, n_errors=overall.n_errors,
                             speedup=(overall.speedup_vs_dense or {}).get("total"),
                             action_error=overall.action_error_vs_dense,
                             contended=overall.contention.contended if overall.contention else None,
                             threads=results.environment.get("torch_threads"),
                             device=results.environment.get("device"))

    def _replay(self, strategy: str, config: dict, output: Path) -> dict:
        from prunebench.engine.loop import PruningEngine
        from prunebench.plugins.manager import MANAGER
        from prunebench.evaluation.replay import RecordedStream, replay, stream_files
        from prunebench.evaluation.results import write_json
        from prunebench.evaluation.streams import SyntheticStream

        evaluation = self.defn.evaluation
        if evaluation.mode == "replay":
            streams = [RecordedStream(p) for p in stream_files(evaluation.streams)]
        else:
            streams = [SyntheticStream(n_queries=evaluation.queries, seed=self.defn.seed,
                                       image_size=self.model.cfg.image_size)]
        if self._engine is None:
            self._engine = PruningEngine(self.model)
            # warm-up, so the first trial does not pay one-off allocation costs in its latency
            replay(self._engine, Dense(), [SyntheticStream(n_queries=2, seed=self.defn.seed + 1,
                   image_size=self.model.cfg.image_size)])
        report = replay(self._engine, MANAGER.create(strategy, config), streams, seed=self.defn.seed,
                        name=strategy)
        write_json(output, report)
        return self._metrics(report.queries, speedup=report.speedup_vs_dense["total"],
                             action_error=report.action_error.mean, contended=report.contention.contended,
                             threads=report.environment["torch_threads"], device=report.environment["device"])

    def _metrics(self, queries, **measured) -> dict[str, Any]:
        """Definitions in prunebench.evaluation.metrics: latency is the median, its breakdown per stage means."""
        return {"latency_ms": queries.latency_ms["total"].median, "gflops": queries.mean_llm_flops / 1e9,
                "visual_tokens": queries.mean_visual_tokens,
                "keep_ratio": queries.mean_visual_tokens / self.n_visual,
                "latency_breakdown_ms": {stage: s.mean for stage, s in queries.latency_ms.items()},
                **measured}


# --------------------------------------------------------------------------- running
class StudyRunner:
    """One worker of a study: fills every strategy study up to its trial count, dense first."""

    def __init__(self, defn: StudyDefinition, log: Callable[[str], None] = print) -> None:
        self.defn, self.log = defn, log
        defn.check_episodes()
        claim_results_dir(defn)
        self.storage = open_storage(defn)
        self.evaluator: Evaluator | None = None
        self._dense: dict | None = None  # the dense baseline's metrics, once it is complete
        self._last_trial = -1  # number of the trial this worker ran last
        self.worker = worker_id()
        self.interrupts = Interrupts()
        self.interrupted_trial: tuple[str, int] | None = None  # (strategy, number), failed and retried
        self._reported: set = set()  # running trials of other hosts' workers, already named in the log

    def run(self) -> None:
        """Ctrl-C or SIGTERM: the trial being evaluated ends FAIL and is retried with its parameters
        (as after a kill), and the KeyboardInterrupt is raised once the storage is up to date."""
        with self.interrupts.installed():
            slot = worker_slot(self.defn, self.storage)
            for strategy in self.defn.searched():
                study = open_study(self.defn, strategy, self.storage, slot)
                check_unknown_trial_files(self.defn, strategy, study)
                self._enqueue(study, strategy)
                self._fill(study, strategy)
            if self.defn.validate_front is not None:
                self.validate_fronts()
            self.interrupts.check()  # a signal held during the last storage write

    def fail_running(self) -> int:
        """Mark RUNNING trials FAIL (and retry them): for a worker on another host that died, with
        a storage without a heartbeat (journal), when no worker is alive. Returns how many."""
        count = 0
        for strategy in self.defn.searched():
            study = open_study(self.defn, strategy, self.storage)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                count += _fail_and_retry(study, t, "its worker was declared dead (--fail-running)",
                                         self.defn.max_retry)
        return count

    def _fail_gone_workers(self, study: optuna.Study) -> list:
        """RUNNING trials whose worker ran on this host and is gone (kill -9, a crash) end FAIL and
        are retried now, without waiting for a heartbeat. Returns the running trials of workers that
        cannot be judged from here (another host)."""
        unknown = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            gone = worker_gone(worker)
            if gone or worker == self.worker:  # this worker runs one trial at a time: a leftover
                _fail_and_retry(study, t, f"its worker {worker} is gone", self.defn.max_retry)
            elif gone is None:
                unknown.append(t)
        return unknown

    def _report_waiting(self, strategy: str, unknown: list) -> None:
        """Once per set of trials: the journal has no heartbeat, so a dead worker on another host
        is never noticed; say what to do."""
        from optuna.storages import JournalStorage

        # a trial without a worker yet is most likely being started right now by a live worker
        unknown = [t for t in unknown if t.user_attrs.get("worker") or t.datetime_start is None
                   or (datetime.datetime.now() - t.datetime_start).total_seconds() > 60]
        key = (strategy, frozenset(t.number for t in unknown))
        if not unknown or not isinstance(self.storage, JournalStorage) or key in self._reported:
            return
        self._reported.add(key)
        workers = sorted({t.user_attrs.get("worker") or "unknown" for t in unknown})
        self.log(f"{strategy}: waiting for trial(s) {', '.join(str(t.number) for t in unknown)} of worker(s) "
                 f"{', '.join(workers)} on another host; the journal storage cannot tell whether they are "
                 "alive: if not, stop here and run 'prunebench study resume DEF --fail-running'")

    def _enqueue(self, study: optuna.Study, strategy: str) -> None:
        """Paper defaults first, then the definition's parameter sets (each once, whoever enqueues)."""
        if strategy == DENSE:
            study.enqueue_trial({}, skip_if_exists=True)
            return
        search = self.defn.search(strategy)
        for params in [default_params(strategy, search)] + search.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)

    def _fill(self, study: optuna.Study, strategy: str) -> None:
        target = self.defn.target(strategy)
        failed_in_a_row = 0
        while True:
            self.interrupts.check()
            optuna.storages.fail_stale_trials(study)  # dead workers' trials -> FAIL (and a retry)
            unknown = self._fail_gone_workers(study)
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state == TrialState.COMPLETE for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if done >= target:
                return
            if done + running >= target:  # the rest are in other workers' hands
                self._report_waiting(strategy, unknown)
                time.sleep(self.defn.poll_s)
                continue
            self.log(f"{strategy}: next trial ({done}/{target} complete)")
            study.optimize(self._objective(strategy), n_trials=1, catch=(TrialFailed,),
                           callbacks=[_retry_failed(self.defn.max_retry)])
            self.interrupts.check()  # an interrupted trial is failed and retried by now
            last = study.get_trials(deepcopy=False)[self._last_trial]  # not a retry enqueued after it
            failed_in_a_row = failed_in_a_row + 1 if last.state == TrialState.FAIL else 0
            if failed_in_a_row > self.defn.max_retry:  # not one config's bad luck: stop, don't spin
                raise RunAborted(f"study {self.defn.name}: {failed_in_a_row} trials of {strategy} in a "
                                 f"row failed, the last with: {last.user_attrs.get('error')}")

    def _objective(self, strategy: str):
        def objective(trial: optuna.Trial) -> list[float]:
            self._last_trial = trial.number
            trial.set_user_attr("worker", self.worker)  # first: a dead worker's trial is told by it
            if _surplus(trial, self.defn.target(strategy)):
                trial.set_user_attr("surplus", True)  # two workers asked at once; the other was first
                raise optuna.TrialPruned("the trial count is reached by other workers")
            config = strategy_config(strategy, self.defn.search(strategy), trial if strategy != DENSE else None)
            trial.set_user_attr("config", config.model_dump(mode="json"))
            earlier = _same_params(trial)
            if earlier is not None:
                metrics = {k: earlier.user_attrs[k] for k in METRICS if k in earlier.user_attrs}
                trial.set_user_attr("duplicate_of", earlier.number)
                trial.set_user_attr("results", earlier.user_attrs.get("results"))
            else:
                output = trial_file(self.defn, strategy, trial.number)
                trial.set_user_attr("results", str(output))
                try:
                    metrics = self._evaluate(strategy, config.model_dump(), output)
                except TrialFailed as err:
                    trial.set_user_attr("error", err.args[0])
                    trial.set_user_attr("traceback", err.traceback)
                    raise
                except KeyboardInterrupt as err:  # fail (and retry) the trial as a killed worker's is
                    self.interrupts.stop = self.interrupts.stop or err
                    self.interrupted_trial = (strategy, trial.number)
                    trial.set_user_attr("error", INTERRUPTED)
                    raise TrialFailed(INTERRUPTED) from None
            unmeasured = [o for o in self.defn.objectives if metrics.get(o) is None]
            if unmeasured:  # e.g. no episode had an outcome: never report a made-up value
                trial.set_user_attr("error", f"{unmeasured[0]} was not measured")
                raise TrialFailed(f"{unmeasured[0]} was not measured (errors: {metrics.get('n_errors')})")
            for key, value in metrics.items():
                trial.set_user_attr(key, value)
            self._constrain(trial, metrics)
            self.log(f"{strategy}: trial {trial.number}: " + ", ".join(
                f"{o} {metrics[o]:.4g}" for o in self.defn.objectives))
            return [float(metrics[o]) for o in self.defn.objectives]

        return objective

    def _evaluate(self, strategy: str, config: dict, output: Path, closed_loop: dict | None = None) -> dict:
        try:
            with self.interrupts.immediate():  # no storage write in here: a signal stops it at once
                self.evaluator = self.evaluator or Evaluator(self.defn)
                return self.evaluator(strategy, config, output, closed_loop)
        except RunAborted as err:  # this config's episodes kept erroring: the trial fails
            raise TrialFailed(str(err), traceback.format_exc()) from err
        except PrunebenchError:
            raise  # a usage error stops the worker with its one-line message
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - this trial fails (and is retried); the study goes on
            raise TrialFailed(f"{type(err).__name__}: {err}", traceback.format_exc()) from err

    def _constrain(self, trial: optuna.Trial, metrics: dict) -> None:
        c = self.defn.constraints
        if c.max_success_drop is not None:
            dense = self.dense_metrics()
            drop = (dense["success_rate"] - metrics["success_rate"]) if dense else 0.0
            trial.set_constraint("success_drop", drop - c.max_success_drop)
        if c.max_action_error is not None:
            trial.set_constraint("action_error", metrics["action_error"] - c.max_action_error)

    def dense_metrics(self) -> dict | None:
        if self._dense is None:
            study = open_study(self.defn, DENSE, self.storage)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            self._dense = done[0].user_attrs if done else None
        return self._dense

    # multi-fidelity ---------------------------------------------------------------------
    def validate_fronts(self) -> None:
        """Evaluate each strategy's front points (and the dense baseline) in closed loop; the
        results land in the study's ``validated:<trial>`` user attributes."""
        closed_loop = self.defn.validate_front.closed_loop
        for strategy in self.defn.searched():
            study = open_study(self.defn, strategy, self.storage)
            for frozen in _front(study):
                key = validated_key(frozen.number)
                if key in study.user_attrs:
                    continue
                output = trial_file(self.defn, strategy, frozen.number, "_closed_loop")
                self.log(f"{strategy}: validating trial {frozen.number} in closed loop")
                metrics = self._evaluate(strategy, frozen.user_attrs["config"], output, closed_loop)
                # a finished trial cannot be updated: the study holds the validation
                study.set_user_attr(key, {**metrics, "results": str(output)})


def validated_key(trial_number: int) -> str:
    """The study user attribute holding a trial's closed-loop validation."""
    return f"validated:{trial_number}"


def _front(study: optuna.Study) -> list:
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def _surplus(trial: optuna.Trial, target: int) -> bool:
    """True when earlier trials (complete or running) already make up the target count."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
               if t.number < trial.number]
    return len(earlier) >= target


def _same_params(trial: optuna.Trial):
    """A complete trial of this study with the same parameters (a repeated suggestion), or None."""
    if not trial.params:
        return None
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params and "duplicate_of" not in t.user_attrs:
            return t
    return None


class _Retry(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry (a WAITING trial with the same parameters, ``failed_trial`` and
    ``retry_history`` system attributes), without the failed trial's user attributes: the retry's
    worker, error and results file are its own (a copied ``worker`` would name a dead process)."""

    def __call__(self, study: optuna.Study, trial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {}
        super().__call__(study, trial)


def _retry_failed(max_retry: int):
    """Retry a trial that raised (stale trials are retried by the storage's own callback)."""
    retry = _Retry(max_retry=max_retry)

    def callback(study: optuna.Study, trial) -> None:
        if trial.state == TrialState.FAIL:
            why = trial.user_attrs.get("error", "its worker stopped")
            if why != INTERRUPTED:  # the run's own last line says so
                print(f"{study.study_name} trial {trial.number} failed: {why}; retrying (at most {max_retry} "
                      "times)", file=sys.stderr)
            retry(study, trial)

    return callback


def _fail_and_retry(study: optuna.Study, trial, why: str, max_retry: int) -> int:
    """Mark a RUNNING trial FAIL and retry it with the same parameters; 0 if another worker did first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "error", why)
        if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            return 0
    except optuna.exceptions.UpdateFinishedTrialError:
        return 0
    _retry_failed(max_retry)(study, storage.get_trial(trial._trial_id))
    return 1
