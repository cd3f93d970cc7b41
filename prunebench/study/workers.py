"""Running a study: a worker fills every strategy study up to its trial count, alone or beside others,
and keeps going through failed, dead and interrupted trials.

Several workers can run ``study run`` on one definition at once; each stops when its strategy has
``trials`` complete trials (a trial that two workers start at the same moment beyond the count is
dropped as PRUNED, ``surplus``). A parameter set already evaluated is not evaluated again: the trial
reuses the earlier measurement (``duplicate_of``).

Each trial's full results file lands in ``<results_dir>/<strategy>/<name>_trial_<n>.json``; the trial's
user attributes hold its metrics (see :data:`prunebench.study.definition.METRICS`), config, worker and
results path. :mod:`prunebench.study.guard` keeps the stored results true: a study's identity, its folder,
its storage file, dead workers' trials, interrupts.
"""

from __future__ import annotations

import datetime
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from prunebench.contract.errors import PrunebenchError, RunAborted
from prunebench.plugins.dense import DENSE
from prunebench.study.definition import METRICS, StudyDefinition
from prunebench.study.evaluator import Evaluator, TrialFailed
from prunebench.study.guard import (
    Interrupts,
    check_unknown_trial_files,
    claim_results_dir,
    trial_file,
    worker_gone,
    worker_id,
)
from prunebench.study.space import default_params, strategy_config
from prunebench.study.storage import Retry, open_storage, open_study, validated_key, worker_slot

INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"  # a trial's error: retried without a message


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
        for params in [default_params(strategy, search, self.defn.n_layers)] + search.enqueue:
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
            config = strategy_config(strategy, self.defn.search(strategy), trial if strategy != DENSE else None,
                                     n_layers=self.defn.n_layers)
            trial.set_user_attr("config", config.model_dump(mode="json"))
            if _enqueued_twice(trial):  # two workers enqueued the same parameters at once
                trial.set_user_attr("surplus", True)
                raise optuna.TrialPruned("the same enqueued parameters run in another worker")
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
        closed_loop = self.defn.validation_closed_loop
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


def _front(study: optuna.Study) -> list:
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def _surplus(trial: optuna.Trial, target: int) -> bool:
    """True when earlier trials (complete or running) already make up the target count."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
               if t.number < trial.number]
    return len(earlier) >= target


def _enqueued_twice(trial: optuna.Trial) -> bool:
    """An earlier trial with the same parameters is running: Optuna's ``skip_if_exists`` is not
    atomic, so two workers enqueueing at once can both add the paper defaults."""
    if not trial.params:
        return False
    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return any(t.number < trial.number and t.params == trial.params for t in running)


def _same_params(trial: optuna.Trial):
    """A complete trial of this study with the same parameters (a repeated suggestion), or None."""
    if not trial.params:
        return None
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params and "duplicate_of" not in t.user_attrs:
            return t
    return None


def _retry_failed(max_retry: int):
    """Retry a trial that raised (stale trials are retried by the storage's own callback)."""
    retry = Retry(max_retry=max_retry)

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
