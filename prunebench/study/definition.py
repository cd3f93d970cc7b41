"""Study definitions: what a study searches and how its trials are measured, validated in full when
the file is loaded, so that a mistake stops the study before any worker starts.

A study definition (YAML/JSON, :class:`StudyDefinition`) names the strategies, how one trial is
evaluated (closed-loop LIBERO, replay of recorded streams, or a synthetic stream for smoke tests),
the objectives, constraints, sampler and seed. Every strategy gets its own Optuna study
``<name>/<strategy>`` in one storage, plus ``<name>/none``: the dense baseline, one trial, run first.
A strategy's own ``Config.search_space(trial)`` proposes its configs; the definition can narrow a
parameter's range (``space``), hold it at a value (``fixed``), hold config fields (``config``) and
add parameter sets to evaluate first (``enqueue``, after the paper defaults).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from prunebench.contract.errors import PrunebenchError
from prunebench.plugins.dense import DENSE
from prunebench.runtime.inputs import load_config, one_line
from prunebench.study.guard import no_parent_steps, storage_file
from prunebench.study.space import check_search, model_depth

MODES = ("closed_loop", "replay", "synthetic")
# objective -> (direction, evaluation modes that measure it, meaning)
OBJECTIVES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "success_rate": ("maximize", ("closed_loop",), "closed-loop success rate"),
    "latency_ms": ("minimize", MODES, "median query latency, ms (scoring and pruning included)"),
    "speedup": ("maximize", MODES, "median dense / median pruned query time, same process"),
    "action_error": ("minimize", MODES, "mean |a - a_dense| per query, normalised actions"),
    "gflops": ("minimize", MODES, "mean LLM GFLOPs per query"),
}
MEASURED_AGAINST_DENSE = ("speedup", "action_error")  # need the dense forward on every query
METRICS = ("success_rate", "success_ci95", "n_episodes", "n_errors", "latency_ms", "latency_p10_ms",
           "latency_p90_ms", "speedup", "action_error", "gflops", "visual_tokens", "keep_ratio", "latency_breakdown_ms",
           "contended", "threads", "device")  # how the latency was measured (prunebench.evaluation.contention)


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
    """Multi-fidelity: after the search, evaluate each strategy's front (and the dense baseline) in
    closed loop again, e.g. on more episodes. In a closed-loop study these fields override the
    evaluation's (``{episodes: 12}`` escalates the same protocol); otherwise they are the whole run."""

    model_config = ConfigDict(extra="forbid")
    closed_loop: dict[str, Any] = Field(default_factory=dict)  # EvalConfig fields, as in Evaluation


class StudyDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    storage: str | None = None  # default sqlite:///<results_dir>/study.db
    results_dir: str | None = None  # default results/studies/<name>
    # --plugin files or modules the strategies come from (paths relative to the current directory);
    # validated first, so the strategies below may name what they register
    plugins: list[str] = Field(default_factory=list)
    evaluation: Evaluation = Field(default_factory=Evaluation)  # before strategies: their model
    strategies: dict[str, StrategySearch]
    trials: int = Field(20, ge=1)
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

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, value: list[str]) -> list[str]:
        from prunebench.plugins.manager import add_plugins

        add_plugins(value)  # a bad one is a one-line PluginError naming it
        return value

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, value: dict[str, StrategySearch], info: ValidationInfo) -> dict[str, StrategySearch]:
        from prunebench.plugins.manager import MANAGER

        installed = MANAGER.strategies()
        evaluation = info.data.get("evaluation")
        n_layers = model_depth(evaluation.model if evaluation else None)  # layer ranges fit the model
        for name, search in value.items():
            if name not in installed:
                raise ValueError(f"{name}: unknown strategy (installed: {', '.join(installed)})")
            check_search(name, search, n_layers)
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
            Evaluation(mode="closed_loop", closed_loop=self.validation_closed_loop)
        return self

    @property
    def validation_closed_loop(self) -> dict[str, Any]:
        """The closed-loop fields front trials are validated with (see :class:`ValidateFront`)."""
        base = self.evaluation.closed_loop if self.evaluation.mode == "closed_loop" else {}
        return {**base, **(self.validate_front.closed_loop if self.validate_front else {})}

    @property
    def n_layers(self) -> int:
        """Depth of the study's model: what the strategies' layer ranges are fitted to."""
        return model_depth(self.evaluation.model)

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
                mode="closed_loop", closed_loop=self.validation_closed_loop).eval_config(DENSE, {}, 0)
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
