"""Optuna studies: definitions, runs, Pareto fronts, hypervolume, resume after SIGKILL, two workers."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from prunebench.cli.main import main
from prunebench.study.definition import StudyDefinition, load_study_definition
from prunebench.study.pareto import hypervolume, pareto_mask, trials_table
from prunebench.study.space import default_params
from prunebench.study.storage import open_storage, study_name
from prunebench.study.workers import StudyRunner


def write_definition(tmp_path, **fields) -> str:
    defn = {"name": "t", "results_dir": str(tmp_path / "results"),
            "strategies": {"random": {"trials": 3}, "fastv": {"trials": 3, "space": {"keep_ratio": [0.2, 0.8]},
                                                               "fixed": {"rows": "last"}}},
            "evaluation": {"mode": "synthetic", "queries": 3},
            "objectives": ["action_error", "latency_ms"], "heartbeat_s": 1, "grace_s": 10, "poll_s": 0.2}
    defn.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(defn))
    return str(path)


def complete_trials(defn: StudyDefinition, strategy: str):
    study = optuna.load_study(study_name=study_name(defn, strategy), storage=open_storage(defn))
    return study.get_trials(states=(TrialState.COMPLETE,))


# --------------------------------------------------------------------------- definitions
@pytest.mark.parametrize("fields, message", [
    ({"strategies": {"nope": {}}}, "nope: unknown strategy"),
    ({"strategies": {"fastv": {"space": {"keep": [0.1, 0.5]}}}}, "'keep' is not a parameter of fastv"),
    ({"strategies": {"fastv": {"config": {"keep_ratio": 2}}}}, "fastv.config.keep_ratio': Input should be less"),
    ({"objectives": ["success_rate"]}, "success_rate is not measured in mode synthetic"),
    ({"objectives": ["speed"]}, "unknown 'speed'"),
    ({"evaluation": {"mode": "closed_loop", "closed_loop": {"episodes": 0}}}, "closed_loop.episodes"),
    ({"sampler": "cmaes"}, "sampler"),
    # every value a trial can get is checked before anything runs, not in a worker mid-study
    ({"strategies": {"fastv": {"fixed": {"keep_ratio": 7}}}}, "fastv.fixed.keep_ratio': Input should be less"),
    ({"strategies": {"fastv": {"space": {"keep_ratio": [0.1, 7]}}}}, "fastv.space.keep_ratio': Input should be"),
    ({"strategies": {"fastv": {"enqueue": [{"keep_ratio": 7}]}}}, "fastv.enqueue[0].keep_ratio: 7 is outside"),
    ({"strategies": {"fastv": {"enqueue": [{"keep": 0.5}]}}}, "fastv.enqueue[0]: 'keep' is not a searched"),
    ({"strategies": {"fastv": {"fixed": {"rows": "last"}, "enqueue": [{"rows": "text"}]}}},
     "fastv.enqueue[0]: 'rows' is not a searched"),
    # names and folders stay where they say
    ({"name": ".."}, "field 'name': '..' is not a plain name"),
    ({"name": "a/b"}, "field 'name': 'a/b' is not a plain name"),
    ({"results_dir": "results/../../elsewhere"}, "field 'results_dir': '..' is not allowed"),
    ({"storage": "sqlite:///../study.db"}, "field 'storage': '..' is not allowed"),
    ({"storage": "journal:results/../../study.log"}, "field 'storage': '..' is not allowed"),
])
def test_bad_definitions_get_one_line_errors(tmp_path, capsys, fields, message):
    path = write_definition(tmp_path, **fields)
    assert main(["study", "run", path]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "results").exists()  # nothing ran, nothing was written


def test_paper_defaults_map_to_parameters():
    from prunebench.study.definition import StrategySearch

    assert default_params("fastv", StrategySearch()) == {"keep_ratio": 0.5, "rows": "last"}
    narrowed = StrategySearch(space={"keep_ratio": [0.6, 0.9]})
    assert "keep_ratio" not in default_params("fastv", narrowed)  # out of the narrowed range


def test_layer_ranges_fit_the_depth_of_the_study_model(tmp_path, tiny_path):
    from prunebench.study.space import parameters

    assert parameters("fastv", 4)["layer"] == ("int", [0, 2])  # the built-in model: as before
    assert parameters("fastv", 32)["layer"] == ("int", [0, 16])
    assert parameters("vla-pruner", 32)["action_layer"] == ("int", [1, 31])
    assert parameters("random")["after_layer"] == ("int", [-1, 2])  # no model named: the built-in one
    defn = load_study_definition(write_definition(tmp_path, evaluation={"mode": "synthetic", "queries": 3,
                                                                       "model": tiny_path}))
    from tests.conftest import TINY

    assert defn.n_layers == TINY.n_layers
    # a range the study's model cannot have is refused before any trial
    bad = write_definition(tmp_path, strategies={"fastv": {"space": {"layer": [0, 40]}}})
    assert main(["study", "run", bad]) == 2


def test_a_definition_names_its_plugins(tmp_path, monkeypatch, capsys):
    from prunebench.plugins import manager

    monkeypatch.setattr(manager, "MANAGER", manager.PluginManager())
    monkeypatch.delenv(manager.PLUGIN_FILES, raising=False)
    plugin = tmp_path / "mine.py"
    plugin.write_text("import prunebench\n"
                      "from prunebench.strategies.random import RandomPruning\n\n"
                      "class Mine(RandomPruning):\n    name = 'mine'\n\n"
                      "@prunebench.hookimpl\n"
                      "def prunebench_register_strategies(register):\n    register(Mine)\n")
    defn = load_study_definition(write_definition(tmp_path, plugins=[str(plugin)],
                                                  strategies={"mine": {"trials": 1}}))
    assert "mine" in defn.strategies and str(plugin) in manager.plugin_specs()  # workers load it too
    missing = write_definition(tmp_path, plugins=[str(tmp_path / "nope.py")], strategies={"random": {}})
    assert main(["study", "run", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.py" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- pareto maths
def test_pareto_mask_and_hypervolume():
    points = np.array([[1.0, 4.0], [2.0, 2.0], [3.0, 3.0], [4.0, 1.0]])
    assert pareto_mask(points).tolist() == [True, True, False, True]
    assert pareto_mask(points, np.array([True, False, True, True])).tolist() == [True, False, True, True]
    # staircase under reference (5, 5): 4*1 + 3*2... computed by hand: (2-1)*1 + (4-2)*3 + (5-4)*4
    assert hypervolume(points[pareto_mask(points)], np.array([5.0, 5.0])) == pytest.approx(1 + 6 + 4)
    cube = hypervolume(np.array([[0.0, 0.0, 0.0]]), np.array([1.0, 2.0, 3.0]))
    assert cube == pytest.approx(6.0)


# --------------------------------------------------------------------------- a whole study
@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    path = write_definition(tmp_path, strategies={
        "random": {"trials": 3, "enqueue": [{"keep_ratio": 0.3, "after_layer": -1}]},
        "fastv": {"trials": 3, "space": {"keep_ratio": [0.2, 0.8]}, "fixed": {"rows": "last"}}},
        constraints={"max_action_error": 0.05})
    defn = load_study_definition(path)
    StudyRunner(defn, log=lambda m: None).run()
    return defn, path


def test_study_runs_dense_first_then_defaults_then_search(finished_study):
    defn, _ = finished_study
    assert len(complete_trials(defn, "none")) == 1
    random_trials = complete_trials(defn, "random")
    assert len(random_trials) == 3
    assert random_trials[0].params == {"keep_ratio": 0.5, "after_layer": -1}  # paper default first
    assert random_trials[1].params == {"keep_ratio": 0.3, "after_layer": -1}  # then the enqueued set
    fastv = complete_trials(defn, "fastv")
    assert all(0.2 <= t.params["keep_ratio"] <= 0.8 and "rows" not in t.params for t in fastv)
    assert all(t.user_attrs["config"]["rows"] == "last" for t in fastv)
    study = optuna.load_study(study_name=study_name(defn, "fastv"), storage=open_storage(defn))
    assert study.metric_names == ["action_error", "latency_ms"]
    for t in random_trials:  # each trial's full results file, and the metrics in its attributes
        report = json.loads(open(t.user_attrs["results"]).read())
        assert report["action_error"]["mean"] == pytest.approx(t.values[0])
        assert set(t.constraints) == {"action_error"}


def test_trials_table_fronts_and_export(finished_study, tmp_path):
    defn, path = finished_study
    df = trials_table(defn)
    assert len(df) == 7 and df["dense"].sum() == 1
    dense = df[df["dense"]].iloc[0]
    assert dense["action_error"] == 0 and dense["combined_front"]  # nothing beats zero error
    for _, group in df.groupby("strategy"):
        assert group["front"].any()
    infeasible = df[~df["feasible"]]
    assert not infeasible["front"].any() and not infeasible["combined_front"].any()
    assert (df.loc[~df["feasible"], "action_error"] > 0.05).all()

    assert main(["study", "export", path, "-o", str(tmp_path / "t.csv")]) == 0
    assert main(["study", "export", path, "-o", str(tmp_path / "t.json")]) == 0
    exported = json.loads((tmp_path / "t.json").read_text())
    assert len(exported["trials"]) == 7 and exported["objectives"] == ["action_error", "latency_ms"]
    assert exported["hypervolume_history"][-1]["hypervolume"] > 0
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("strategy,trial")


def test_rerun_adds_nothing_and_more_trials_resume(finished_study, tmp_path, capsys):
    defn, path = finished_study
    before = {t.number: t.values for t in complete_trials(defn, "random")}
    assert main(["study", "resume", path]) == 0
    assert {t.number: t.values for t in complete_trials(defn, "random")} == before
    assert "Pareto front per strategy" in capsys.readouterr().out


def test_every_plot_renders(finished_study, tmp_path):
    from prunebench.cli.study import _table
    from prunebench.study.plots import quality_vs_keep_ratio, speedup_per_suite

    defn, path = finished_study
    assert main(["plot", path, "-o", str(tmp_path / "plots"), "--queries", "3"]) == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    for stem in ("pareto_front", "quality_vs_keep_ratio", "speedup_per_suite", "latency_breakdown",
                 "hypervolume", "kept_tokens_fastv", "kept_patches_fastv", "kept_tokens_random"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
        assert (tmp_path / "plots" / f"{stem}.png").stat().st_size > 5000

    # closed-loop results (per-episode success, per-suite speedups) drive the same plots
    df = _table(defn)
    for i, row in df.iterrows():
        fake = {"episodes": [{"success": bool((i + k) % 2)} for k in range(4)],
                "per_suite": {"libero_object": {"speedup_vs_dense": {"total": 1.0 + 0.1 * i}}}}
        result = tmp_path / f"closed_loop_{i}.json"
        result.write_text(json.dumps(fake))
        df.loc[i, "results"] = str(result)
    df["success_rate"] = 0.5
    assert quality_vs_keep_ratio(df, tmp_path / "closed" / "keep")[0].stat().st_size > 5000
    assert speedup_per_suite(df, tmp_path / "closed" / "suite")[0].stat().st_size > 5000


# --------------------------------------------------------------------------- crash and workers
def _study_cli(*args) -> list[str]:
    return [sys.executable, "-m", "prunebench.cli.main", "study", *args]


def running_trial(defn, deadline: float, min_complete: int = 1):
    """Wait for a random trial that is being evaluated (its config is set just before), after
    ``min_complete`` complete ones."""
    storage = None
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            storage = storage or open_storage(defn)
            study = optuna.load_study(study_name=study_name(defn, "random"), storage=storage)
        except Exception:  # noqa: BLE001 - the study does not exist yet
            continue
        trials = study.get_trials(deepcopy=False)
        if sum(t.state == TrialState.COMPLETE for t in trials) >= min_complete:
            running = [t for t in trials if t.state == TrialState.RUNNING and "config" in t.user_attrs]
            if running:
                return running[0]
    raise AssertionError("no trial started")


def test_sigkill_mid_trial_then_resume_loses_no_completed_trial(tmp_path):
    # trials long enough (40 queries) for the poll below to catch one running
    path = write_definition(tmp_path, strategies={"random": {"trials": 6}},
                            evaluation={"mode": "synthetic", "queries": 40}, grace_s=3)
    defn = load_study_definition(path)
    worker = subprocess.Popen(_study_cli("run", path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    running_trial(defn, time.time() + 240, min_complete=2)
    assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: (t.values, t.user_attrs["results"]) for t in complete_trials(defn, "random")}
    assert len(before) >= 2

    time.sleep(defn.grace_s + 1)  # the killed trial's heartbeat is now stale
    done = subprocess.run(_study_cli("resume", path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = complete_trials(defn, "random")
    assert len(after) == 6
    assert {t.number: (t.values, t.user_attrs["results"]) for t in after if t.number in before} == before
    study = optuna.load_study(study_name=study_name(defn, "random"), storage=open_storage(defn))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1  # the killed one, failed by the heartbeat check ...
    retried = [t for t in after if t.system_attrs.get("failed_trial") == failed[0].number]
    assert retried and retried[0].params == failed[0].params  # ... and run again with its parameters


@pytest.mark.parametrize("storage", ["postgresql", "journal"])
def test_two_workers_on_one_study(tmp_path, request, storage):
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else f"journal:{tmp_path}/j.log"
    # trials long enough (40 queries) that one worker cannot finish all 8 before the other starts
    path = write_definition(tmp_path, storage=url, strategies={"random": {"trials": 8}},
                            evaluation={"mode": "synthetic", "queries": 40})
    defn = load_study_definition(path)
    workers = [subprocess.Popen(_study_cli("run", path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=300) == 0, w.stderr.read()[-2000:]
    done = complete_trials(defn, "random")
    assert len(done) == 8  # together exactly the requested count (a surplus trial is dropped)
    assert len({t.number for t in done}) == len(done)
    evaluated = [t for t in done if "duplicate_of" not in t.user_attrs]
    assert len({json.dumps(t.params, sort_keys=True) for t in evaluated}) == len(evaluated)
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers ran trials
    assert len(complete_trials(defn, "none")) == 1  # the dense baseline ran once, not per worker


@pytest.mark.parametrize("sampler", ["nsga2", "gp"])
def test_other_samplers_run(tmp_path, sampler):
    path = write_definition(tmp_path, sampler=sampler, strategies={"random": {"trials": 3}},
                            evaluation={"mode": "synthetic", "queries": 2},
                            sampler_options={"population_size": 2} if sampler == "nsga2" else {})
    defn = load_study_definition(path)
    StudyRunner(defn, log=lambda m: None).run()
    assert len(complete_trials(defn, "random")) == 3


@pytest.mark.libero
def test_front_is_validated_in_closed_loop(tmp_path):
    from prunebench.evaluation.libero_env import libero_available

    if not libero_available():
        pytest.skip("LIBERO not installed (extra 'libero')")
    closed_loop = {"suite": "libero_object", "tasks": [0], "episodes": 1, "max_steps": 16,
                   "render_quality": "fast", "hard_reset": False}
    path = write_definition(tmp_path, strategies={"random": {"trials": 2}},
                            evaluation={"mode": "synthetic", "queries": 2},
                            validate_front={"closed_loop": closed_loop})
    defn = load_study_definition(path)
    StudyRunner(defn, log=lambda m: None).run()
    df = trials_table(defn)
    front = df[df["front"]]
    assert front["validated_success_rate"].notna().all() and front["validated_n_episodes"].eq(1).all()
    # the search's front points were validated, the others not; the final front is among the validated
    assert df.loc[df["fidelity"].eq("search"), "validated_success_rate"].isna().all()
    assert front["fidelity"].eq("validated").all() and front["n_episodes"].eq(1).all()
    trial = front[~front["dense"]]["trial"].iloc[0]
    validated = json.loads((tmp_path / "results" / "random" / f"t_trial_{trial}_closed_loop.json").read_text())
    assert validated["complete"] and validated["config"]["max_steps"] == 16


def test_a_failing_trial_is_one_line_and_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    from prunebench.study import evaluator as study_module

    real = study_module.Evaluator.__call__

    def evaluate(self, strategy, config, output, closed_loop=None):
        if strategy == "random":
            raise ValueError("kaboom")
        return real(self, strategy, config, output, closed_loop)

    monkeypatch.setattr(study_module.Evaluator, "__call__", evaluate)
    path = write_definition(tmp_path, strategies={"random": {"trials": 2}}, max_retry=1)
    assert main(["study", "run", path]) == 1
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if "failed" in line]
    assert "Traceback" not in err and len(failures) == 3  # two trials, then the run stops
    assert failures[0].startswith("t/random trial 0 failed: ValueError: kaboom; retrying")
    assert failures[-1] == ("error: study t: 2 trials of random in a row failed, the last with: "
                            "ValueError: kaboom")
    trial = optuna.load_study(study_name="t/random", storage=f"sqlite:///{tmp_path}/results/study.db").trials[0]
    trace = trial.user_attrs["traceback"]
    assert trial.state == TrialState.FAIL and "in evaluate" in trace and trace.endswith("ValueError: kaboom\n")
