"""Where a study's trials live: the Optuna storage, one Optuna study per strategy in it, and what
Optuna logs about them; shared by the workers that write and the commands that only read.

Storage (an existing engine, not ours): ``sqlite:///file.db`` (default, resumable), ``journal:file``
(Optuna's journal file: several processes on one host), ``postgresql://...`` (several machines).
RDB storages run a heartbeat: a trial whose worker died (SIGKILL, lost machine) is marked FAIL after
``grace_s`` and retried, as is a trial that raised.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import TYPE_CHECKING

import optuna

from prunebench.contract.errors import PrunebenchError
from prunebench.study.guard import check_identity, check_storage_file, storage_file

if TYPE_CHECKING:
    from prunebench.study.definition import StudyDefinition


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


class Retry(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry (a WAITING trial with the same parameters, ``failed_trial`` and
    ``retry_history`` system attributes), without the failed trial's user attributes: the retry's
    worker, error and results file are its own (a copied ``worker`` would name a dead process)."""

    def __call__(self, study: optuna.Study, trial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {}
        super().__call__(study, trial)


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
                                  heartbeat_stale_trial_callback=Retry(defn.max_retry))
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


def validated_key(trial_number: int) -> str:
    """The study user attribute holding a trial's closed-loop validation."""
    return f"validated:{trial_number}"
