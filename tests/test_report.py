"""``prunebench report``: merging shards and runs of closed-loop results, what is refused, the tables,
report.json and the plots. Closed-loop runs play a scripted env (no simulator), with the real
``evaluate`` around it."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from prunebench.cli.main import main
from prunebench.evaluation import libero_env
from prunebench.evaluation.closed_loop import EvalConfig, evaluate
from prunebench.evaluation.episode import EpisodeRunner
from prunebench.evaluation.libero_env import WAIT_STEPS, StepState, TaskInfo
from prunebench.evaluation.merge import merge_results
from prunebench.evaluation.paired import compare_to_baseline

STRATEGIES = {"none": {}, "random": {"keep_ratio": 0.25}, "fastv": {"keep_ratio": 0.25}}


class SceneEnv:
    """Frames that depend on the task, the init state and the time (so episodes differ); whether the
    episode succeeds is a pseudo-random function of the first executed policy action (the parity of
    its x in units of 1e-4): an outcome that depends on exactly what the pruned model saw."""

    def __init__(self, job):
        self.task = SimpleNamespace(suite=job.suite, task_id=job.task_id, name=f"task{job.task_id}",
                                    instruction="pick up the alphabet soup and place it in the basket")

    def reset(self, init_state_id, seed=0):
        self.t, self.init, self.success = 0, init_state_id, False
        return self._state()

    def step(self, action):
        self.t += 1
        if self.t == WAIT_STEPS + 1:
            self.success = int(abs(float(action[0])) * 1e4) % 2 == 0
        return self._state()

    def render(self):
        rng = np.random.default_rng([self.task.task_id, self.init, self.t])
        return {v: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for v in ("agentview", "wrist")}

    def close(self):
        pass

    def _state(self):
        return StepState(eef_pos=np.zeros(3), eef_quat=np.array([0, 0, 0, 1.0]),
                         proprio=np.zeros(8, np.float32), success=self.success)


@pytest.fixture(scope="module")
def no_simulator():
    """evaluate() on SceneEnv: two tasks of 20 init states each, no LIBERO needed."""
    fake_tasks = [TaskInfo("libero_object", i, f"task{i}", "pick", "", 20) for i in range(2)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(libero_env, "libero_modules", lambda: None)
        patch.setattr(libero_env, "tasks", lambda suite: fake_tasks)
        patch.setattr(EpisodeRunner, "_libero_env", lambda self, job: SceneEnv(job))
        yield


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    tiny_model.save(path)
    return str(path)


def run_all(out_dir, tiny_path, tasks, episodes=4, first_init_state=0, **extra):
    """Every strategy of STRATEGIES over ``tasks``: out_dir/<strategy>.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, config in STRATEGIES.items():
        cfg = EvalConfig(strategy=name, config=config, model=tiny_path, suite="libero_object", tasks=tasks,
                         episodes=episodes, first_init_state=first_init_state, max_steps=8, **extra)
        evaluate(cfg, out_dir / f"{name}.json", command=f"test {tasks}")
    return out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_file, no_simulator):
    """The same run whole (tasks 0 and 1) and as two shards (task 0, task 1), once for the module."""
    root = tmp_path_factory.mktemp("runs")
    for folder, tasks in (("whole", [0, 1]), ("shard0", [0]), ("shard1", [1])):
        run_all(root / folder, tiny_file, tasks)
    return root


def _outcomes(res):
    return [(e.suite, e.task_id, e.init_state_id, e.seed, e.success, e.steps, e.n_queries) for e in res.episodes]


def test_shards_merge_to_the_unsharded_run(runs):
    files = lambda d: sorted((runs / d).glob("*.json"))  # noqa: E731
    whole = merge_results(files("whole"))
    sharded = merge_results(files("shard0") + files("shard1"))
    assert set(whole) == set(sharded) == set(STRATEGIES)
    for name in STRATEGIES:
        a, b = whole[name], sharded[name]
        assert _outcomes(a) == _outcomes(b) and len(a.episodes) == 8
        # success and its interval per task and overall are equal; latencies are measurements of
        # separate runs and are not compared
        for key in ("n_episodes", "n_success", "n_errors", "success_rate", "success_ci95", "mean_steps"):
            assert getattr(a.overall, key) == getattr(b.overall, key), key
            assert {t: getattr(g, key) for t, g in a.per_task.items()} == \
                   {t: getattr(g, key) for t, g in b.per_task.items()}, key
        assert a.init_state_ids == b.init_state_ids == {f"libero_object/{t}": [0, 1, 2, 3] for t in (0, 1)}
        assert [s["file"] for s in b.config["merged_from"]] == [str(runs / f"shard{i}" / f"{name}.json")
                                                              for i in (0, 1)]
    episodes = lambda merged: {k: r.episodes for k, r in merged.items()}  # noqa: E731
    paired_whole, paired_sharded = compare_to_baseline(episodes(whole)), compare_to_baseline(episodes(sharded))
    assert paired_whole == paired_sharded and paired_whole["random"].n_pairs == 8
    # the outcomes are not all alike (the test would show nothing otherwise)
    assert 0 < sum(e.success for r in whole.values() for e in r.episodes) < 24


def test_report_prints_the_table_and_per_task_rates(runs, tmp_path, capsys):
    # a directory stands for every results file under it (compare --jobs: <suite>/<strategy>/<shard>.json)
    shutil.copytree(runs / "shard0", tmp_path / "nested" / "libero_object" / "a")
    shutil.copytree(runs / "shard1", tmp_path / "nested" / "libero_object" / "b")
    assert main(["report", str(tmp_path / "nested"), "--per-task", "--delta", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "not worse (δ 10 pts)" in out
    assert "6 file(s), 3 strategies, 24 episodes" in out
    assert "success rate per task:" in out and "libero_object/1" in out
    for name in STRATEGIES:
        assert any(line.startswith(name) for line in out.splitlines())


def test_init_state_shards_merge_and_configs_get_labels(tmp_path, tiny_file, no_simulator):
    run_all(tmp_path / "a", tiny_file, [0], episodes=2)
    run_all(tmp_path / "b", tiny_file, [0], episodes=2, first_init_state=2)
    merged = merge_results(sorted((tmp_path / "a").glob("*.json")) + sorted((tmp_path / "b").glob("*.json")))
    assert merged["fastv"].init_state_ids == {"libero_object/0": [0, 1, 2, 3]}
    other = EvalConfig(strategy="fastv", config={"keep_ratio": 0.5}, model=tiny_file, tasks=[0], episodes=2,
                       max_steps=8)
    evaluate(other, tmp_path / "fastv_half.json")
    labelled = merge_results(sorted((tmp_path / "a").glob("*.json")) + [tmp_path / "fastv_half.json"])
    assert set(labelled) == {"none", "random", "fastv[keep_ratio=0.25]", "fastv[keep_ratio=0.5]"}


# --------------------------------------------------------------------------- refusals
def _edit(src, dst, change):
    data = json.loads(src.read_text())
    change(data)
    dst.write_text(json.dumps(data))
    return str(dst)


def _set(path, value):
    def change(data):
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        if value is KeyError:
            data.pop(last)
        else:
            data[last] = value
    return change


@pytest.mark.parametrize("change, field", [
    (_set("protocol.camera_size", 256), "protocol.camera_size"),
    (_set("protocol.render_quality", "fast"), "protocol.render_quality"),
    (_set("model.sha256", "0" * 64), "model.sha256"),
    (_set("seed", 7), "seed"),
    (_set("protocol.episode_seed", KeyError), "protocol.episode_seed"),
    (_set("environment.versions.prunebench", "0.0.1"), "environment.versions.prunebench"),
    (_set("attention_backend", "eager"), "attention_backend"),
    (_set("schema_version", 1), "schema_version"),
])
def test_runs_that_measured_different_things_are_refused(runs, capsys, change, field):
    a = runs / "shard0" / "fastv.json"
    b = _edit(runs / "shard1" / "fastv.json", runs / "other.json", change)
    assert main(["report", str(a), b]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"field '{field}'" in err and str(a) in err and b in err


def test_duplicate_incomplete_and_bad_files_are_refused(runs, capsys):
    a = runs / "shard0" / "fastv.json"
    copy = runs / "copy.json"
    shutil.copy(a, copy)
    incomplete = _edit(runs / "shard1" / "fastv.json", runs / "cut.json", _set("complete", False))
    (runs / "bad.json").write_text("{not json")
    (runs / "stream.json").write_text(json.dumps({"schema_version": 3, "seed": 0}))
    cases = [([str(a), str(copy)], "field 'episodes'"), ([str(a), incomplete], "field 'complete'"),
             ([str(runs / "missing.json")], "no such file"), ([str(runs / "bad.json")], "not JSON"),
             ([str(runs / "stream.json")], "not a closed-loop results file")]
    for files, expected in cases:
        assert main(["report", *files]) == 2, files
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert main(["report", str(a), incomplete, "--partial"]) == 0  # its finished episodes count


# --------------------------------------------------------------------------- outputs
def test_report_writes_the_report_file_and_plots(runs, tiny_file, no_simulator, tmp_path, capsys):
    # a recorded stream of the dense policy, for the overlays on its frames
    cfg = EvalConfig(strategy="none", model=tiny_file, tasks=[0], episodes=1, max_steps=16,
                     record_dir=str(tmp_path / "streams"))
    evaluate(cfg, tmp_path / "recorded.json")
    stream = next((tmp_path / "streams").glob("*.npz"))
    out = tmp_path / "report"
    assert main(["report", str(runs / "shard0"), str(runs / "shard1"), "-o", str(out),
                 "--stream", str(stream)]) == 0
    for stem in ("success_vs_keep_ratio", "pareto_front", "latency_breakdown", "success_per_task",
                 "kept_tokens_fastv", "kept_patches_fastv", "kept_patches_random"):
        for suffix in (".png", ".pdf"):
            assert (out / f"{stem}{suffix}").stat().st_size > 5000, stem
    report = json.loads((out / "report.json").read_text())
    assert {r["strategy"] for r in report["rows"]} == set(STRATEGIES)
    assert set(report["paired"]) == {"random", "fastv"} and report["paired"]["fastv"]["n_pairs"] == 8
    assert len(report["inputs"]) == 6 and all(i["created"] and i["command"] for i in report["inputs"])
    assert report["per_task"]["none"].keys() == {"libero_object/0", "libero_object/1"}

    # an existing, non-empty output directory is refused without --overwrite, before any work
    capsys.readouterr()
    assert main(["report", str(runs / "whole"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(out) in err and "not empty" in err
    assert main(["report", str(runs / "whole"), "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["inputs"][0]["file"].startswith(str(runs / "whole"))
