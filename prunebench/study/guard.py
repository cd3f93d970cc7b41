"""What keeps a study's stored results true: its identity, its folders, its storage file, its
dead workers and its interrupts.

* **Identity.** The settings its trials were measured under (objectives, evaluation, seed,
  constraints, each strategy's ``config`` and ``fixed``) are stored with each Optuna study when it
  is created and compared on every later run: a change would relabel or mix the stored values.
  Trial counts, ``enqueue``, ``space``, the sampler and the number of processes or threads may change.
* **Folders.** A ``results_dir`` belongs to one study (``study_name.txt``), and trial files carry
  the study's name, so two studies never write over each other's files.
* **Storage files.** Reading never creates a file; a damaged SQLite or journal file is one line
  naming it.
* **Dead workers.** A RUNNING trial whose worker (``host:pid``) ran on this host and whose process
  is gone is failed and retried at once (the journal storage has no heartbeat).
* **Interrupts.** Ctrl-C or SIGTERM stops a trial's evaluation at once; anywhere else (Optuna
  writing to its storage) it waits for the write to end, so the storage is never left half-written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import threading
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunebench.contract.errors import PrunebenchError
from prunebench.runtime.interrupts import Interrupted

if TYPE_CHECKING:
    from prunebench.study.definition import StudyDefinition

IDENTITY_KEY = "prunebench:definition"  # Optuna study system attribute
MARKER = "study_name.txt"  # in results_dir: the study that owns the folder
# closed-loop fields that say how fast or where to, not what is measured
_NOT_IDENTITY = {"strategy", "config", "seed", "model", "device", "threads", "workers", "video_dir",
                 "record_dir", "record_history", "max_repeated_errors"}


# --------------------------------------------------------------------------- paths
def no_parent_steps(path: str | None) -> None:
    """``..`` would put a study's files outside the folder it names (an absolute path is explicit)."""
    if path is not None and ".." in Path(path).parts:
        raise ValueError(f"'..' is not allowed in {path!r}; give a path below the project folder or an "
                         "absolute one")


def storage_file(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` or ``journal:`` URL; None for a database server."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url.removeprefix("sqlite:///").split("?")[0])
    return None


# --------------------------------------------------------------------------- storage files
def check_storage_file(defn: StudyDefinition, create: bool) -> None:
    """Before Optuna opens the storage: a missing file is created only by ``study run``; a file that
    is not a readable SQLite database or journal is refused with one line naming it."""
    path = storage_file(defn.storage_url)
    if path is None:
        return
    if not path.exists():
        if not create:
            raise PrunebenchError(f"no study {defn.name!r}: {path} does not exist (start it with "
                                  "'prunebench study run')")
        return
    if defn.storage_url.startswith("journal:"):
        _check_journal(path)
    else:
        _check_sqlite(path)


def _check_sqlite(path: Path) -> None:
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as err:
        verdict = str(err)
    if verdict != "ok":
        raise PrunebenchError(f"{path}: damaged study storage ({' '.join(verdict.split())[:160]}); move it "
                              "away or give the study another storage")


def _check_journal(path: Path) -> None:
    """Optuna's journal reader stops with a bare JSONDecodeError on a bad line (and skips a bad last
    line, which the next append would glue to a good one)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no end of line")
                json.loads(line)
            except ValueError as err:
                raise PrunebenchError(f"{path}: damaged study journal, line {number} ({type(err).__name__}: "
                                      f"{str(err)[:80]}); move the file away, or remove that line "
                                      "if you know it is the only bad one") from None


@contextmanager
def storage_errors(defn: StudyDefinition):
    """A storage that fails while in use (a damaged page, a lost server): one line naming it."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        cause = err.__cause__ or err
        where = storage_file(defn.storage_url) or defn.storage_url
        raise PrunebenchError(f"storage {where}: {type(cause).__name__}: "
                              f"{str(cause).splitlines()[0][:200]} (a damaged file or a lost server?)") from None


# --------------------------------------------------------------------------- identity
def identity(defn: StudyDefinition, strategy: str) -> dict[str, Any]:
    """What a strategy study's trials were measured under, as flat ``field.sub`` -> value."""
    from prunebench.plugins.dense import DENSE

    ev = defn.evaluation
    out: dict[str, Any] = {
        "objectives": [f"{o} ({d})" for o, d in zip(defn.objectives, defn.directions)],
        "evaluation.mode": ev.mode, "evaluation.model": ev.model, "evaluation.device": ev.device,
        "seed": defn.seed}
    out.update(_flat("constraints", defn.constraints.model_dump()))
    if ev.mode == "closed_loop":
        out.update(_flat("evaluation.closed_loop", _episodes(ev.closed_loop)))
    elif ev.mode == "replay":
        out["evaluation.streams"] = ev.streams
    else:
        out["evaluation.queries"] = ev.queries
    if defn.validate_front is not None:
        out.update(_flat("validate_front.closed_loop", _episodes(defn.validation_closed_loop)))
    if strategy != DENSE:
        search = defn.search(strategy)
        out.update(_flat(f"strategies.{strategy}.config", search.config))
        out.update(_flat(f"strategies.{strategy}.fixed", search.fixed))
    return json.loads(json.dumps(out))  # as the storage gives it back (tuples -> lists)


def _episodes(closed_loop: dict) -> dict:
    """Closed-loop fields with their defaults filled in, so that spelling out a default is no change."""
    from prunebench.evaluation.closed_loop import EvalConfig
    from prunebench.plugins.dense import DENSE

    return EvalConfig(strategy=DENSE, **closed_loop).model_dump(mode="json", exclude=_NOT_IDENTITY)


def _flat(prefix: str, values: dict) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def check_identity(defn: StudyDefinition, strategy: str, study, write: bool) -> None:
    """Refuse a definition whose identity differs from the one stored with ``study``, naming the
    field. With ``write``, a study that has none stored (new, or older than this check) gets it."""
    storage, study_id = study._storage, study._study_id
    current = identity(defn, strategy)
    stored = storage.get_study_system_attrs(study_id).get(IDENTITY_KEY)
    if stored is None:
        if write:
            storage.set_study_system_attr(study_id, IDENTITY_KEY, current)
        return
    for key in list(current) + [k for k in stored if k not in current]:
        old, new = stored.get(key, "(unset)"), current.get(key, "(unset)")
        # a closed-loop field only one side knows comes from another prunebench version
        optional = key.startswith(("evaluation.closed_loop.", "validate_front.")) and (
            key not in stored or key not in current)
        if old != new and not optional:
            raise PrunebenchError(
                f"field {key!r} is {new} here, but study {study.study_name} was created, and its trials "
                f"measured, with {old}; put it back, or give the definition a new name to start a new study")
    if write and any(k not in stored for k in current):  # e.g. validate_front added later
        storage.set_study_system_attr(study_id, IDENTITY_KEY, {**current, **stored})


# --------------------------------------------------------------------------- results folder
def trial_file(defn: StudyDefinition, strategy: str, number: int, suffix: str = "") -> Path:
    """A trial's results file; its name carries the study's name."""
    return defn.results_path / strategy / f"{defn.name}_trial_{number}{suffix}.json"


_TRIAL_FILE = re.compile(r"^(.+)_trial_(\d+)\.json$")


def claim_results_dir(defn: StudyDefinition) -> None:
    """``results_dir`` belongs to the first study that runs there; another study is refused."""
    folder = defn.results_path
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.exists():
        tmp = folder / f".{MARKER}.{os.getpid()}"
        tmp.write_text(defn.name + "\n")
        try:
            os.link(tmp, marker)  # atomic: of two studies starting at once, one claims the folder
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    owner = marker.read_text().strip()
    if owner != defn.name:
        raise PrunebenchError(f"field 'results_dir': {folder} holds the files of study {owner!r} ({marker}); "
                              f"study {defn.name!r} needs its own results_dir")


def check_unknown_trial_files(defn: StudyDefinition, strategy: str, study) -> None:
    """A trial file that the storage has no trial for (a storage deleted or swapped under a kept
    folder) would be overwritten by the next trial of that number: refuse."""
    folder = defn.results_path / strategy
    numbers = [int(m[2]) for p in folder.glob(f"{defn.name}_trial_*.json")
               if (m := _TRIAL_FILE.match(p.name)) and m[1] == defn.name]
    known = len(study.get_trials(deepcopy=False))  # after the glob: a file's trial exists by then
    unknown = sorted(n for n in numbers if n >= known)
    if unknown:
        raise PrunebenchError(f"{trial_file(defn, strategy, unknown[0])} exists but {study.study_name} in "
                              f"{defn.storage_url} has no trial {unknown[0]} (was the storage replaced?); "
                              "move the file away or use another results_dir")


# --------------------------------------------------------------------------- workers
def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_gone(worker: str | None) -> bool | None:
    """True: the worker ran on this host and its process is gone; False: it is alive; None: it ran
    on another host (or is unknown), and only a heartbeat can tell."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


# --------------------------------------------------------------------------- interrupts
class Interrupts:
    """Ctrl-C and SIGTERM during a study run. Inside :meth:`immediate` (a trial's evaluation) the
    signal raises at once; elsewhere it is held until :meth:`check`, so Optuna's storage writes are
    never cut in half. A second signal raises at once wherever it lands."""

    def __init__(self) -> None:
        self.stop: KeyboardInterrupt | None = None
        self._immediate = False

    def _handler(self, signum, frame) -> None:
        first = self.stop is None
        if first:
            self.stop = _interrupt(signum)
        if self._immediate or not first:
            raise self.stop

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self) -> None:
        if self.stop is not None:
            raise self.stop

    @contextmanager
    def immediate(self):
        self.check()
        self._immediate = True
        try:
            yield
        finally:
            self._immediate = False


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Interrupted() if signum == signal.SIGTERM else KeyboardInterrupt()  # exit 143 / 130
