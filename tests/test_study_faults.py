"""A study's stored results survive crashes, signals, shared folders, changed definitions and damaged
storage files; every bad input is one line (exit 2), an interrupt one line (exit 130/143)."""

import os
import random
import shutil
import signal
import socket
import subprocess
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from prunebench.cli.main import main
from prunebench.study.definition import load_study_definition
from prunebench.study.storage import open_storage, open_study, study_name
from prunebench.study.workers import StudyRunner
from tests.test_study import _study_cli, complete_trials, running_trial, write_definition


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def tiny(tmp_path, **fields) -> str:
    """A definition whose study runs in a few seconds (2 random trials on 2 synthetic queries)."""
    base = {"strategies": {"random": {"trials": 2}}, "evaluation": {"mode": "synthetic", "queries": 2}}
    return write_definition(tmp_path, **{**base, **fields})


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One finished study in SQLite and one in a journal file."""
    out = {}
    for kind in ("sqlite", "journal"):
        tmp_path = tmp_path_factory.mktemp(kind)
        storage = {"storage": f"journal:{tmp_path}/results/study.log"} if kind == "journal" else {}
        path = tiny(tmp_path, **storage)
        StudyRunner(load_study_definition(path), log=lambda m: None).run()
        out[kind] = path
    return out


def copy_study(source: str, tmp_path, **changes) -> str:
    """The stored study's files in ``tmp_path``, with its definition changed by ``changes``."""
    defn = yaml.safe_load(open(source))
    src = load_study_definition(source).results_path
    shutil.copytree(src, tmp_path / "results")
    defn["results_dir"] = str(tmp_path / "results")
    if "storage" in defn:
        defn["storage"] = f"journal:{tmp_path}/results/study.log"
    defn.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(defn))
    return str(path)


# --------------------------------------------------------------------------- folders
def test_a_results_dir_holds_one_study_and_every_file_it_knows(stored, tmp_path, capsys):
    path = copy_study(stored["sqlite"], tmp_path)
    files = sorted(p.name for p in (tmp_path / "results" / "random").iterdir())
    assert files == ["t_trial_0.json", "t_trial_1.json"]  # trial files carry the study's name
    before = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*.json")}

    other = copy_study(stored["sqlite"], tmp_path / "other", name="u")
    defn = yaml.safe_load(open(other))
    defn["results_dir"] = str(tmp_path / "results")  # another study, the same folder
    (tmp_path / "u.yaml").write_text(yaml.safe_dump(defn))
    assert main(["study", "run", str(tmp_path / "u.yaml")]) == 2
    err = one_line(capsys)
    assert "'t'" in err and "'u'" in err and "results_dir" in err

    (tmp_path / "results" / "study.db").unlink()  # a storage replaced under a kept folder
    assert main(["study", "run", path]) == 2
    err = one_line(capsys)
    assert "t_trial_0.json exists" in err and "storage" in err
    assert {p: p.read_bytes() for p in (tmp_path / "results").rglob("*.json")} == before


# --------------------------------------------------------------------------- identity
@pytest.mark.parametrize("changes, field", [
    ({"objectives": ["gflops", "latency_ms"]}, "objectives"),  # both minimised: only the name changes
    ({"objectives": ["latency_ms", "action_error"]}, "objectives"),
    ({"evaluation": {"mode": "synthetic", "queries": 3}}, "evaluation.queries"),
    ({"seed": 1}, "seed"),
    ({"constraints": {"max_action_error": 0.1}}, "constraints.max_action_error"),
    ({"strategies": {"random": {"trials": 2, "fixed": {"after_layer": 1}}}}, "strategies.random.fixed.after_layer"),
    ({"strategies": {"random": {"trials": 2, "config": {"keep_ratio": 0.3}}}}, "strategies.random.config.keep_ratio"),
])
def test_a_changed_definition_is_refused_naming_the_field(stored, tmp_path, capsys, changes, field):
    path = copy_study(stored["sqlite"], tmp_path, **changes)
    defn = load_study_definition(path)
    before = {s: [(t.number, t.values) for t in complete_trials(defn, s)] for s in ("none", "random")}
    for command in ("run", "resume", "show"):
        assert main(["study", command, path]) == 2
        err = one_line(capsys)
        assert f"field '{field}'" in err and "new name" in err, err
    assert {s: [(t.number, t.values) for t in complete_trials(defn, s)] for s in ("none", "random")} == before

    renamed = tmp_path / "renamed.yaml"  # a new name starts a new study, in its own folder
    renamed.write_text(open(path).read().replace("name: t", "name: t2").replace(
        str(tmp_path / "results"), str(tmp_path / "results2")))
    assert main(["study", "run", str(renamed)]) == 0


def test_trial_counts_enqueue_and_space_may_change(stored, tmp_path):
    path = copy_study(stored["sqlite"], tmp_path, strategies={"random": {
        "trials": 3, "enqueue": [{"keep_ratio": 0.25}], "space": {"keep_ratio": [0.2, 0.9]}}}, sampler="nsga2",
        evaluation={"mode": "synthetic", "queries": 2, "threads": 1})
    assert main(["study", "run", path]) == 0
    trials = complete_trials(load_study_definition(path), "random")
    assert len(trials) == 3 and trials[2].params["keep_ratio"] == 0.25


# --------------------------------------------------------------------------- storage files
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
@pytest.mark.parametrize("command", ["show", "resume", "export", "plot"])
def test_a_study_that_does_not_exist_creates_nothing(tmp_path, capsys, storage, command):
    fields = {"storage": f"journal:{tmp_path}/results/study.log"} if storage == "journal" else {}
    path = tiny(tmp_path, **fields)
    args = ["study", command, path] if command != "plot" else ["plot", path]
    assert main(args + (["-o", str(tmp_path / "x.csv")] if command == "export" else [])) == 2
    assert "no study 't'" in one_line(capsys)
    assert not (tmp_path / "results" / ("study.log" if storage == "journal" else "study.db")).exists()
    if command in ("show", "resume"):  # (export's and plot's own outputs follow their own rules)
        assert not (tmp_path / "results").exists()


def _garbage(path):
    path.write_bytes(b"this is not a database" * 100)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:5000])


def _overwrite_pages(path):  # opens, then fails at a later query
    data = bytearray(path.read_bytes())
    data[20000:28000] = random.Random(0).randbytes(8000)
    path.write_bytes(bytes(data))


def _bad_journal_line(path):
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"{not json\n"
    path.write_bytes(b"".join(lines))


def _cut_last_journal_line(path):
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize("storage, damage", [
    ("sqlite", _garbage), ("sqlite", _truncate), ("sqlite", _overwrite_pages),
    ("journal", _bad_journal_line), ("journal", _cut_last_journal_line)])
def test_a_damaged_storage_file_is_one_line_naming_it(stored, tmp_path, capsys, storage, damage):
    path = copy_study(stored[storage], tmp_path)
    file = tmp_path / "results" / ("study.db" if storage == "sqlite" else "study.log")
    damage(file)
    for command in ("show", "run"):
        assert main(["study", command, path]) == 2
        err = one_line(capsys)
        assert str(file) in err and "damaged study" in err, err


# --------------------------------------------------------------------------- workers and signals
@pytest.mark.parametrize("signum, storage", [(signal.SIGINT, "sqlite"), (signal.SIGTERM, "journal"),
                                             (signal.SIGKILL, "journal"), (signal.SIGKILL, "postgresql")])
def test_a_stopped_trial_is_retried_with_its_parameters_on_resume(tmp_path, request, signum, storage):
    fields = {"storage": f"journal:{tmp_path}/results/study.log"} if storage == "journal" else {}
    if storage == "postgresql":  # a fresh database per test: the server is shared by the session
        fields = {"storage": request.getfixturevalue("postgres_url"), "name": f"t{os.getpid()}{time.time_ns()}"}
    path = write_definition(tmp_path, strategies={"random": {"trials": 3}},
                            evaluation={"mode": "synthetic", "queries": 40}, grace_s=600, **fields)
    defn = load_study_definition(path)
    worker = subprocess.Popen(_study_cli("run", path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stopped = running_trial(defn, time.time() + 240)
        worker.send_signal(signum)
        err = worker.communicate(timeout=120)[1]
    finally:
        worker.kill()
    if signum == signal.SIGKILL:
        assert worker.returncode == -signal.SIGKILL
    else:
        assert worker.returncode == 128 + signum, err[-2000:]
        assert "Traceback" not in err
        ours = [line for line in err.strip().splitlines()
                if line.strip() and not line.startswith(("[I ", "none:", "random:"))]
        assert ours == [f"interrupted: trial {stopped.number} of random is retried with the same parameters "
                        f"by 'prunebench study resume {path}'"], err[-2000:]

    # resume: no flag, no waiting for the heartbeat's grace period (600 s here)
    done = subprocess.run(_study_cli("resume", path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name=study_name(defn, "random"), storage=open_storage(defn))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [stopped.number]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == stopped.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == stopped.params and retried[0].user_attrs["worker"] != stopped.user_attrs["worker"]
    assert len(complete_trials(defn, "random")) == 3


def test_a_running_trial_of_a_gone_worker_is_retried_and_another_host_s_is_named(tmp_path, monkeypatch):
    path = tiny(tmp_path, storage=f"journal:{tmp_path}/results/study.log",
                strategies={"random": {"trials": 1}})
    defn = load_study_definition(path)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid of this host that is no longer alive
    logs = []
    runner = StudyRunner(defn, log=logs.append)
    study = open_study(defn, "random", runner.storage)
    for worker in (f"{socket.gethostname()}:{gone.pid}", "elsewhere:1"):
        trial = study.ask({"keep_ratio": optuna.distributions.FloatDistribution(0.1, 1.0)})
        study._storage.set_trial_user_attr(trial._trial_id, "worker", worker)

    class Waited(Exception):
        pass

    def sleep(seconds):
        raise Waited

    monkeypatch.setattr("prunebench.study.workers.time.sleep", sleep)
    with pytest.raises(Waited):  # the other host's trial makes up the count: wait for it, and say so
        runner._fill(study, "random")
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert study.trials[2].system_attrs["failed_trial"] == 0
    assert study.trials[2].params == study.trials[0].params
    assert "elsewhere:1" in logs[-1] and "--fail-running" in logs[-1] and len(logs) == 1


# --------------------------------------------------------------------------- the whole definition
@pytest.mark.libero
def test_closed_loop_tasks_are_checked_against_the_suite(tmp_path, capsys):
    from prunebench.evaluation.libero_env import libero_available

    if not libero_available():
        pytest.skip("LIBERO not installed (extra 'libero')")
    capsys.readouterr()
    path = tiny(tmp_path, evaluation={"mode": "closed_loop", "closed_loop": {"suite": "libero_object",
                                                                             "tasks": [0, 10]}},
                objectives=["success_rate", "latency_ms"])
    assert main(["study", "run", path]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "robosuite" not in line]
    assert len(err) == 1 and "field 'evaluation.closed_loop.tasks'" in err[0] and "[10]" in err[0], err
    assert not (tmp_path / "results").exists()
