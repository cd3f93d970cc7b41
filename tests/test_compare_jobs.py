"""``prunebench compare --storage URL --jobs NAME``: a comparison as jobs that workers on many machines
share through an Optuna storage; retried when a worker dies, never run twice, collected from the storage."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from prunebench.cli.compare import strategy_configs
from prunebench.cli.main import main
from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.libero_env import libero_available
from prunebench.study.jobs import RESULTS_KEY, JobStore, expand, job_file, load_jobs, pack, shards, unpack


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "robosuite" not in line.lower()
           and line.strip()]
    assert len(err) == 1, err
    return err[0]


def compare_args(model: str, storage: str, name: str, out, *extra) -> list[str]:
    """A plan of 2 jobs per task (dense and random) of 8-step episodes on the tiny model."""
    return ["compare", "--suite", "libero_object", "--strategies", "random", "--model", model,
            "--max-steps", "8", "--render-quality", "fast", "--fast-reset", "--storage", storage,
            "--jobs", name, "-o", str(out), "--threads", "1", *extra]


def worker(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prunebench.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def trials(storage: str, name: str) -> list:
    return load_jobs(JobStore(storage, name)).get_trials()


def assert_each_job_complete_once(all_trials: list, n_jobs: int) -> list:
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["job"] for t in complete) == list(range(n_jobs)), Counter(t.state for t in all_trials)
    return complete


# --------------------------------------------------------------------------- the plan
def test_shards_cover_every_episode_once():
    def episodes(parts):
        return sorted((t, first + k) for tasks, first, n in parts for t in tasks for k in range(n))

    every = [(t, k) for t in (0, 1, 2) for k in range(5)]
    assert shards([0, 1, 2], 5, 5) == [([0], 0, 5), ([1], 0, 5), ([2], 0, 5)]  # default: a task per job
    assert shards([0, 1, 2], 5, 2)[:3] == [([0], 0, 2), ([0], 2, 2), ([0], 4, 1)]
    assert shards([0, 1, 2], 5, 12) == [([0, 1], 0, 5), ([2], 0, 5)]
    for k in (1, 2, 3, 5, 7, 10, 15, 100):
        assert episodes(shards([0, 1, 2], 5, k)) == every


def test_a_plan_is_every_suite_shard_and_strategy_config_with_dense_as_a_job():
    strategies = strategy_configs(["random", "none"], [0.25, 0.5, 0.25])
    assert strategies == {"none": ("none", {}), "random_keep0.25": ("random", {"keep_ratio": 0.25}),
                          "random_keep0.5": ("random", {"keep_ratio": 0.5})}
    assert list(strategy_configs(["random"], [0.5])) == ["none", "random"]  # one ratio: the plain name
    plan = {"suite": ["libero_object", "libero_goal"], "tasks": None, "episodes": 4, "shard_episodes": 2}
    jobs = expand(plan, strategies, lambda suite: [0, 1] if suite == "libero_object" else [3])
    assert len(jobs) == (2 * 2 + 1 * 2) * 3
    assert jobs[0] == {"suite": "libero_object", "label": "none", "strategy": "none", "config": {}, "tasks": [0],
                       "first_init_state": 0, "episodes": 2, "shard": "tasks0_init0-1"}
    assert str(job_file(jobs[-1])) == "libero_goal/random_keep0.5/tasks3_init2-3.json"
    assert len({job_file(j) for j in jobs}) == len(jobs)
    assert unpack(pack('{"a": 1}' * 1000)) == '{"a": 1}' * 1000


def test_job_flags_are_checked_with_one_line(tmp_path, capsys):
    assert main(["compare", "--suite", "libero_object", "--jobs", "x"]) == 2
    assert "--storage" in one_line(capsys)
    assert main(["compare", "--suite", "libero_object", "--storage", f"sqlite:///{tmp_path}/j.db"]) == 2
    assert "--jobs" in one_line(capsys)
    assert main(["compare", "--keep-ratio", "0.25", "0.5", "--queries", "2"]) == 2
    assert "--keep-ratio" in one_line(capsys)
    assert main(["compare", "--storage", f"sqlite:///{tmp_path}/none.db", "--jobs", "x", "--collect",
                 str(tmp_path / "c")]) == 2
    assert "none.db does not exist" in one_line(capsys)
    optuna.create_study(storage=f"sqlite:///{tmp_path}/other.db", study_name="compare/y")
    assert main(["compare", "--storage", f"sqlite:///{tmp_path}/other.db", "--jobs", "x", "--collect",
                 str(tmp_path / "c")]) == 2
    assert "no jobs 'x'" in one_line(capsys)
    assert not (tmp_path / "c").exists() and not (tmp_path / "j.db").exists()


# --------------------------------------------------------------------------- workers
@pytest.mark.libero
@pytest.mark.skipif(not libero_available(), reason="LIBERO not installed")
def test_two_workers_share_the_jobs_on_postgresql(tmp_path, tiny_path, postgres_url):
    name = f"two{os.getpid()}{time.time_ns()}"  # the server is shared by the session
    # 4 jobs of several seconds each, both workers started at once: each takes some
    args = [compare_args(tiny_path, postgres_url, name, tmp_path / f"machine{i}", "--tasks", "0", "1")
            for i in range(2)]  # an output folder each, as on machines without a shared file system
    workers = [worker(a) for a in args]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
        assert "4/4 jobs complete" in out and "--collect DIR" in out
    complete = assert_each_job_complete_once(trials(postgres_url, name), 4)
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both workers ran jobs
    for t in complete:  # each job's file lies with the worker that ran it, and in the storage
        path = tmp_path / f"machine{[str(w.pid) for w in workers].index(t.user_attrs['worker'].split(':')[1])}"
        assert (path / job_file(t.user_attrs["spec"])).read_text() == unpack(t.user_attrs[RESULTS_KEY])

    assert main(["compare", "--storage", postgres_url, "--jobs", name, "--collect", str(tmp_path / "all")]) == 0
    files = sorted(p.relative_to(tmp_path / "all") for p in (tmp_path / "all").rglob("*.json"))
    assert files == sorted(job_file(t.user_attrs["spec"]) for t in complete)
    for path in files:
        results = json.loads((tmp_path / "all" / path).read_text())
        assert results["complete"] and len(results["episodes"]) == 1
        assert results["config"]["max_steps"] == 8 and results["protocol"]["stock"] is False
        assert results["config"]["tasks"] == [int(path.stem.split("_")[0].removeprefix("tasks"))]


@pytest.mark.libero
@pytest.mark.skipif(not libero_available(), reason="LIBERO not installed")
def test_a_killed_worker_s_job_is_retried_by_another_and_completes_once(tmp_path, tiny_path):
    storage = f"journal:{tmp_path}/jobs.log"
    args = compare_args(tiny_path, storage, "k", tmp_path / "out", "--tasks", "0")
    first = worker(args)
    deadline, running = time.time() + 120, None
    try:
        while running is None and time.time() < deadline:
            time.sleep(0.2)
            try:
                # killed only once the job names its worker: before that, no storage can tell a
                # dead worker's job from one a live worker is starting (the journal has no heartbeat)
                running = next((t for t in trials(storage, "k") if t.state == TrialState.RUNNING
                                and "spec" in t.user_attrs and "worker" in t.user_attrs), None)
            except PrunebenchError:  # not created yet
                continue
        assert running is not None, "no job started"
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    second = worker(args)  # the same command: the same output folder, on the same host
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    assert "2/2 jobs complete" in out  # the killed job, and the other one unless the first worker ran it
    all_trials = trials(storage, "k")
    complete = assert_each_job_complete_once(all_trials, 2)
    killed = all_trials[running.number]
    assert killed.state == TrialState.FAIL and "is gone" in killed.user_attrs["error"]
    retry = [t for t in all_trials if t.system_attrs.get("failed_trial") == running.number]
    assert len(retry) == 1 and retry[0] in complete and retry[0].params == killed.params
    assert retry[0].user_attrs["worker"].endswith(f":{second.pid}")
    for t in complete:
        assert json.loads((tmp_path / "out" / job_file(t.user_attrs["spec"])).read_text())["complete"]


@pytest.mark.libero
@pytest.mark.skipif(not libero_available(), reason="LIBERO not installed")
def test_complete_jobs_never_rerun_and_another_plan_is_refused(tmp_path, tiny_path, capsys):
    storage = f"sqlite:///{tmp_path}/jobs.db"
    args = compare_args(tiny_path, storage, "p", tmp_path / "out", "--tasks", "0")
    assert main(args) == 0
    before = [(t.number, t.state, t.datetime_complete) for t in trials(storage, "p")]
    assert len(before) == 2
    capsys.readouterr()
    assert main(args) == 0  # nothing left: nothing runs again
    assert [(t.number, t.state, t.datetime_complete) for t in trials(storage, "p")] == before
    assert "2/2 jobs complete, 0 of them on this worker" in capsys.readouterr().out

    for changed, flag in ((["--keep-ratio", "0.25"], "--keep-ratio"), (["--max-steps", "16"], "--max-steps"),
                          (["--tasks", "1"], "--tasks"), (["--shard-episodes", "2", "--episodes", "2"],
                                                          "--episodes")):
        assert main(args + changed) == 2
        err = one_line(capsys)
        assert err.startswith(f"error: {flag} is ") and "jobs p" in err and "another --jobs name" in err, err
    assert len(trials(storage, "p")) == 2

    assert main(["compare", "--storage", storage, "--jobs", "p", "--collect", str(tmp_path / "c")]) == 0
    assert sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*.json")) == [
        "libero_object/none/tasks0_init0-0.json", "libero_object/random/tasks0_init0-0.json"]
    assert main(["compare", "--storage", storage, "--jobs", "p", "--collect", str(tmp_path / "c")]) == 2
    assert "not empty" in one_line(capsys)  # an existing output is refused (--overwrite replaces it)


@pytest.mark.libero
@pytest.mark.skipif(not libero_available(), reason="LIBERO not installed")
def test_several_keep_ratios_without_a_storage_run_in_this_process(tmp_path, tiny_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--suite", "libero_object", "--tasks", "0", "--strategies", "random",
                 "--keep-ratio", "0.25", "0.5", "--model", tiny_path, "--max-steps", "8",
                 "--render-quality", "fast", "--fast-reset", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines() if line.startswith(("none ", "random_"))] == [
        "none", "random_keep0.25", "random_keep0.5"]
    assert sorted(p.name for p in out.iterdir()) == ["none.json", "random_keep0.25.json", "random_keep0.5.json"]
    assert json.loads((out / "random_keep0.25.json").read_text())["config"]["config"]["keep_ratio"] == 0.25
