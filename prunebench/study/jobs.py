"""A comparison as jobs on an Optuna storage: ``prunebench compare --storage URL --jobs NAME``.

The plan (every suite × strategy config × shard of tasks and init states) is one Optuna study,
``compare/<NAME>``, in the storage that studies use: the first worker stores the arguments and a hash
of the expanded jobs in its user attributes and enqueues one trial per job (parameter ``job``, the
job's spec in the ``spec`` user attribute). Every worker, on any machine, runs the same command: it
is refused if its arguments give another plan, and otherwise takes the next WAITING trial (popped
atomically on RDB storages), runs it with :func:`prunebench.evaluation.closed_loop.evaluate`, and
stores the results file in the trial (zlib + base64, ``results_zlib``) before completing it, so
that ``--collect`` can assemble every file on a machine without a shared file system.

Failures are the study workers' (:mod:`prunebench.study.workers`): a job that raises, a dead worker's
job (a heartbeat on RDB storages; at once for a gone process of this host) and an interrupted one
end FAIL and are retried with the same parameters; a complete job never runs again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from prunebench.contract.errors import PrunebenchError, RunAborted
from prunebench.study.evaluator import TrialFailed
from prunebench.study.guard import Interrupts, storage_file, worker_gone, worker_id
from prunebench.study.storage import Retry, open_storage
from prunebench.study.workers import INTERRUPTED, _fail_and_retry, _retry_failed

RESULTS_KEY = "results_zlib"  # a trial's results file: zlib-compressed, base64
MARKER = ".prunebench-jobs"  # in a worker's output folder: the jobs whose files it holds


@dataclass(frozen=True)
class JobStore:
    """Where the jobs live: what :func:`~prunebench.study.storage.open_storage` and the storage checks
    of :mod:`~prunebench.study.guard` read (a study definition's fields of the same names)."""

    storage_url: str
    jobs: str  # the name given with --jobs
    heartbeat_s: int = 30  # RDB storages: a running job's heartbeat period ...
    grace_s: int = 120  # ... and how long without one before another worker retries it
    max_retry: int = 2
    poll_s: float = 2.0  # a worker waiting for other workers' jobs checks this often

    @property
    def name(self) -> str:
        return f"compare/{self.jobs}"


# --------------------------------------------------------------------------- the plan
def shards(tasks: list[int], episodes: int, per_shard: int) -> list[tuple[list[int], int, int]]:
    """(tasks, first init state, episodes) of each shard of ``per_shard`` episodes: a task's init
    states split in runs of ``per_shard``, or whole tasks grouped when ``per_shard`` holds several."""
    if per_shard >= episodes:
        group = per_shard // episodes
        return [(tasks[i:i + group], 0, episodes) for i in range(0, len(tasks), group)]
    return [([t], first, min(per_shard, episodes - first)) for t in tasks for first in range(0, episodes, per_shard)]


def shard_name(tasks: list[int], first: int, episodes: int) -> str:
    if len(tasks) > 1 and tasks == list(range(tasks[0], tasks[-1] + 1)):
        names = f"{tasks[0]}-{tasks[-1]}"
    else:
        names = "+".join(map(str, tasks))
    return f"tasks{names}_init{first}-{first + episodes - 1}"


def expand(plan: dict, strategies: dict[str, tuple[str, dict]], task_ids: Callable[[str], list[int]]) -> list[dict]:
    """Every job of ``plan`` (the compare arguments, by flag name): per suite, per shard, per strategy label (the dense
    baseline first). ``task_ids(suite)``: every task of a suite, when ``plan['tasks']`` is None."""
    jobs = []
    for suite in plan["suite"]:
        ids = plan["tasks"] if plan["tasks"] is not None else task_ids(suite)
        for tasks, first, episodes in shards(ids, plan["episodes"], plan["shard_episodes"] or plan["episodes"]):
            for label, (name, config) in strategies.items():
                jobs.append({"suite": suite, "label": label, "strategy": name, "config": config, "tasks": tasks,
                             "first_init_state": first, "episodes": episodes,
                             "shard": shard_name(tasks, first, episodes)})
    return jobs


def job_file(spec: dict) -> Path:
    """A job's results file, relative to the output folder."""
    return Path(spec["suite"]) / spec["label"] / f"{spec['shard']}.json"


def plan_hash(jobs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(jobs, sort_keys=True).encode()).hexdigest()


def pack(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def unpack(packed: str) -> str:
    return zlib.decompress(base64.b64decode(packed)).decode()


# --------------------------------------------------------------------------- storage
def open_jobs(store: JobStore, plan: dict, jobs: list[dict], log: Callable[[str], None]) -> optuna.Study:
    """The jobs' study: created, with the plan and one enqueued trial per job, by the first worker
    (creating a study is atomic: one worker wins); checked against ``plan`` by every other."""
    storage = open_storage(store)  # a damaged storage file: one line naming it
    sampler = optuna.samplers.RandomSampler(seed=0)  # never asked: every trial is an enqueued job
    plan, digest = json.loads(json.dumps(plan)), plan_hash(jobs)
    try:
        study = optuna.create_study(storage=storage, study_name=store.name, sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=store.name, storage=storage, sampler=sampler)
        _wait_for_plan(study, store, plan, digest)
        return study
    held = Interrupts()  # Ctrl-C waits for the plan to be whole (a second one does not)
    with held.installed():
        study.set_user_attr("planner", worker_id())
        study.set_user_attr("plan", plan)
        study.set_user_attr("plan_hash", digest)
        for index, spec in enumerate(jobs):
            study.enqueue_trial({"job": index}, user_attrs={"spec": spec})
        study.set_user_attr("n_jobs", len(jobs))  # last: the plan is complete
    held.check()
    log(f"{store.name}: stored {len(jobs)} jobs in {store.storage_url}")
    return study


def _wait_for_plan(study: optuna.Study, store: JobStore, plan: dict, digest: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while True:
        attrs = study.user_attrs
        if "plan" in attrs:
            _check_plan(attrs["plan"], plan, store)
        if "n_jobs" in attrs:
            break
        planner = attrs.get("planner")
        if worker_gone(planner) or time.time() > deadline:
            raise PrunebenchError(f"--jobs {store.jobs}: its plan was never fully stored in {store.storage_url} "
                                  f"(worker {planner} stopped while storing it); give another --jobs name")
        time.sleep(0.5)
    if attrs["plan_hash"] != digest:
        raise PrunebenchError(f"--jobs {store.jobs}: the same arguments give other jobs here than those stored in "
                              f"{store.storage_url} (another LIBERO, strategy or prunebench version?); run the "
                              "first worker's installation, or give another --jobs name")


def _check_plan(stored: dict, plan: dict, store: JobStore) -> None:
    for key in list(plan) + [k for k in stored if k not in plan]:
        old, new = stored.get(key, "(unset)"), plan.get(key, "(unset)")
        if old != new:
            raise PrunebenchError(f"--{key.replace('_', '-')} is {new} here, but jobs {store.jobs} in "
                                  f"{store.storage_url} were planned with {old}; give the first worker's arguments, "
                                  "or another --jobs name")


def load_jobs(store: JobStore) -> optuna.Study:
    """The jobs' study, for reading (nothing is created)."""
    path = storage_file(store.storage_url)
    if path is not None and not path.exists():
        raise PrunebenchError(f"--storage: {path} does not exist")
    storage = open_storage(store)
    if store.name not in optuna.study.get_all_study_names(storage):
        raise PrunebenchError(f"--jobs: no jobs {store.jobs!r} in {store.storage_url}")
    return optuna.load_study(study_name=store.name, storage=storage)


def claim_folder(out: Path, store: JobStore, overwrite: bool = False) -> None:
    """A worker's output folder holds the files of one set of jobs (a marker file names it); the
    workers of that set share it, any other output is refused."""
    from prunebench.runtime.outputs import claim

    marker = out / MARKER
    for attempt in range(2):
        if marker.exists():
            owner = marker.read_text().strip()
            if owner != store.name:
                raise PrunebenchError(f"-o {out}: holds the files of {owner}, not of {store.name}; give "
                                      "another output folder")
            return
        try:
            claim(out, "", overwrite, directory=True)  # empty (or new): ours
        except PrunebenchError:
            if attempt:  # not a worker of ours that wrote the marker meanwhile
                raise
            continue
        tmp = out / f"{MARKER}.{os.getpid()}"
        tmp.write_text(store.name + "\n")
        try:
            os.link(tmp, marker)  # atomic: of two workers starting at once, one writes it
        except FileExistsError:
            pass
        finally:
            tmp.unlink()


# --------------------------------------------------------------------------- a worker
class JobRunner:
    """One worker: runs the next unfinished job until none is left."""

    def __init__(self, store: JobStore, study: optuna.Study, jobs: list[dict], out: Path,
                 run_job: Callable[[dict, Path], object], log: Callable[[str], None] = print) -> None:
        self.store, self.study, self.jobs, self.out, self.run_job, self.log = store, study, jobs, out, run_job, log
        self.worker = worker_id()
        self.interrupts = Interrupts()
        self.interrupted_job: int | None = None  # failed and retried
        self.ran = 0  # jobs this worker completed
        self._last_trial = -1

    def run(self) -> int:
        """Returns how many jobs are complete; RunAborted when some failed every retry."""
        with self.interrupts.installed():
            failed_in_a_row = 0
            while True:
                self.interrupts.check()
                optuna.storages.fail_stale_trials(self.study)  # dead workers' jobs -> FAIL (and a retry)
                self._fail_gone_workers()
                trials = self.study.get_trials(deepcopy=False)
                complete = {t.params["job"] for t in trials if t.state == TrialState.COMPLETE}
                if not any(t.state == TrialState.WAITING for t in trials):
                    if len(complete) == len(self.jobs):
                        return len(complete)
                    if any(t.state == TrialState.RUNNING for t in trials):
                        time.sleep(self.store.poll_s)  # other workers' jobs; if they die, retried
                        continue
                    raise RunAborted(self._failed_message(trials, complete))
                try:
                    self.study.optimize(self._objective, n_trials=1, catch=(TrialFailed,),
                                        callbacks=[_retry_failed(self.store.max_retry)])
                except BaseException:
                    self._retry_unretried()  # a usage error or a 2nd signal: the job is someone else's
                    raise
                self.interrupts.check()  # an interrupted job is failed and retried by now
                last = self.study.get_trials(deepcopy=False)[self._last_trial]
                failed_in_a_row = failed_in_a_row + 1 if last.state == TrialState.FAIL else 0
                if failed_in_a_row > self.store.max_retry:  # not one job's bad luck: stop, don't spin
                    raise RunAborted(f"{self.store.name}: {failed_in_a_row} jobs in a row failed on this worker, "
                                     f"the last with: {last.user_attrs.get('error')}")

    def _objective(self, trial: optuna.Trial) -> float:
        self._last_trial = trial.number
        trial.set_user_attr("worker", self.worker)  # first: a dead worker's job is told by it
        fixed = trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params", {})
        if "job" not in fixed:  # another worker took the last waiting job first
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("no job was waiting")
        index = trial.suggest_int("job", 0, len(self.jobs) - 1)
        if any(t.params.get("job") == index for t in self.study.get_trials(deepcopy=False,
                                                                           states=(TrialState.COMPLETE,))):
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"job {index} is complete")  # never run twice
        spec = self.jobs[index]
        trial.set_user_attr("spec", spec)  # a retry has none of the failed trial's user attributes
        output = self.out / job_file(spec)
        trial.set_user_attr("results", str(output))
        self.log(f"{self.store.name}: job {index} ({len(self.jobs)} in all): {job_file(spec).with_suffix('')}")
        try:
            with self.interrupts.immediate():  # no storage write in here: a signal stops it at once
                results = self.run_job(spec, output)
        except RunAborted as err:  # the job's episodes kept erroring: it fails (and is retried)
            return self._fail(trial, str(err), traceback.format_exc())
        except PrunebenchError:
            raise  # a usage error stops the worker with its one-line message
        except KeyboardInterrupt as err:  # fail (and retry) the job as a killed worker's is
            self.interrupts.stop = self.interrupts.stop or err
            self.interrupted_job = index
            trial.set_user_attr("error", INTERRUPTED)
            raise TrialFailed(INTERRUPTED) from None
        except Exception as err:  # noqa: BLE001 - this job fails (and is retried); the worker goes on
            return self._fail(trial, f"{type(err).__name__}: {err}", traceback.format_exc())
        trial.set_user_attr(RESULTS_KEY, pack(output.read_text()))
        overall = getattr(results, "overall", None)
        trial.set_user_attr("n_episodes", len(results.episodes))
        trial.set_user_attr("success_rate", getattr(overall, "success_rate", None))
        self.ran += 1
        return float(len(results.episodes))

    def _fail(self, trial: optuna.Trial, message: str, trace: str):
        trial.set_user_attr("error", message)
        trial.set_user_attr("traceback", trace)
        raise TrialFailed(message, trace)

    def _fail_gone_workers(self) -> None:
        """RUNNING jobs whose worker ran on this host and is gone (kill -9, a crash) end FAIL and are
        retried now, without waiting for a heartbeat (the journal storage has none)."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            if worker_gone(worker) or worker == self.worker:  # one job at a time: a leftover
                _fail_and_retry(self.study, t, f"its worker {worker} is gone", self.store.max_retry)

    def _retry_unretried(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        if not 0 <= self._last_trial < len(trials) or trials[self._last_trial].state != TrialState.FAIL:
            return
        if not any(t.system_attrs.get("failed_trial") == self._last_trial for t in trials):
            Retry(self.store.max_retry)(self.study, trials[self._last_trial])

    def _failed_message(self, trials: list, complete: set) -> str:
        failed = [t for t in trials if t.state == TrialState.FAIL and t.params.get("job") not in complete]
        error = failed[-1].user_attrs.get("error") if failed else "unknown"
        return (f"{self.store.name}: {len(self.jobs) - len(complete)} of {len(self.jobs)} jobs failed "
                f"{self.store.max_retry + 1} times (the last error: {error}); the complete ones are kept")


# --------------------------------------------------------------------------- collecting
def collect(store: JobStore, out: Path, write: Callable[[Path, str], object]) -> tuple[int, int]:
    """Every complete job's results file from the storage, written under ``out`` as the workers
    lay them out. Returns (files written, jobs in the plan)."""
    study = load_jobs(store)
    n_jobs = study.user_attrs.get("n_jobs", 0)
    written = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        write(out / job_file(t.user_attrs["spec"]), unpack(t.user_attrs[RESULTS_KEY]))
        written += 1
    return written, n_jobs
