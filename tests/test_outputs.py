"""Outputs (issue 15): claimed before any work, never silently replaced, never shared by two runs,
written atomically with the user's file mode; bad paths and failed writes are one line."""

import errno
import json
import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from prunebench.cli.main import main
from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.results import read_eval_results, read_results, write_json
from prunebench.runtime import outputs

STAMP = "20250101T120000"


@pytest.fixture
def tiny(tmp_path, tiny_model):
    path = tmp_path / "tiny.safetensors"
    tiny_model.save(path)
    return str(path)


@pytest.fixture
def fake_libero(monkeypatch):
    """Closed-loop runs without the simulator: one task with 50 init states, FakeEnv episodes."""
    from prunebench.evaluation import libero_env as libero
    from prunebench.evaluation.episode import EpisodeRunner
    from tests.test_closed_loop import FakeEnv

    task = libero.TaskInfo("libero_object", 0, "fake", "pick up the alphabet soup", "", 50)
    monkeypatch.setattr(libero, "libero_modules", lambda: None)
    monkeypatch.setattr(libero, "tasks", lambda suite: [task])
    monkeypatch.setattr(EpisodeRunner, "_libero_env", lambda self, job: FakeEnv(job))


def stream_run(tiny, *more):
    return main(["run", "--strategy", "random", "--queries", "2", "--model", tiny, *more])


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def no_work(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("prunebench.cli.arguments.build_engine", refuse)


# --------------------------------------------------------------------------- concurrent runs
def test_a_second_run_on_the_same_output_stops_at_once_and_the_first_keeps_its_file(
        tmp_path, tiny, monkeypatch, capsys):
    import prunebench.evaluation.runner as runner

    out = tmp_path / "r.json"
    real, second = runner.run_stream, []

    def run_stream(*args, **kwargs):  # while the first run works, a second one starts on its -o
        if not second:
            second.append(None)
            second[0] = stream_run(tiny, "-o", str(out), "--queries", "3")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_stream", run_stream)
    assert stream_run(tiny, "-o", str(out)) == 0
    assert second == [2]
    [line] = error_lines(capsys)
    assert str(out) in line and "exists" in line
    assert read_results(out).summary.n_queries == 2  # the first run's, whole


def test_runs_started_in_the_same_second_get_their_own_default_files(tmp_path, tiny, monkeypatch, capsys):
    import prunebench.evaluation.runner as runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outputs, "stamp", lambda: STAMP)
    real, second = runner.run_stream, []

    def run_stream(*args, **kwargs):  # while the first run works, a second one starts
        if not second:
            second.append(None)
            second[0] = stream_run(tiny, "--queries", "3")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_stream", run_stream)
    assert stream_run(tiny) == 0 and second == [0]
    first, other = Path(f"results/stream_random_{STAMP}.json"), Path(f"results/stream_random_{STAMP}-2.json")
    assert read_results(first).summary.n_queries == 2 and read_results(other).summary.n_queries == 3
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert sorted(wrote) == sorted([f"wrote {first}", f"wrote {other}"])
    # a run that fails before writing leaves no empty file behind
    assert main(["run", "--strategy", "random", "--queries", "2", "--model", "missing.safetensors"]) == 2
    assert sorted(p.name for p in Path("results").iterdir()) == sorted([first.name, other.name])


def test_threads_racing_for_one_path_or_one_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outputs, "stamp", lambda: STAMP)
    n = 8

    def race(*args):  # n threads call outputs.claim(*args) at once
        start, won, lost = threading.Barrier(n), [], []

        def claim():
            start.wait()
            try:
                won.append(outputs.claim(*args))
            except PrunebenchError as err:
                lost.append(str(err))

        threads = [threading.Thread(target=claim) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return won, lost

    with outputs.releasing():
        won, lost = race(str(tmp_path / "same.json"), "x", False)
        assert len(won) == 1 and len(lost) == n - 1 and all("exists" in e for e in lost)
        won, lost = race(None, "x", False)
        assert not lost and len(set(won)) == n and all(p.exists() for p in won)
    assert not any(p.exists() for p in won)  # never written: released


# --------------------------------------------------------------------------- existing outputs
def test_compare_refuses_an_existing_file_unless_overwrite(tmp_path, tiny, capsys):
    out = tmp_path / "c.json"
    out.write_text("mine")
    compare = ["compare", "--queries", "2", "--strategies", "random", "--model", tiny, "-o", str(out)]
    assert main(compare) == 2
    [line] = error_lines(capsys)
    assert str(out) in line and "--overwrite" in line and out.read_text() == "mine"
    # --overwrite replaces it only once the new run writes: a run that fails first keeps it
    assert main(compare[:4] + ["nope"] + compare[5:] + ["--overwrite"]) == 2
    assert out.read_text() == "mine"
    assert main(compare + ["--overwrite"]) == 0
    assert {r["strategy"] for r in json.loads(out.read_text())["rows"]} == {"none", "random"}


def test_closed_loop_compare_claims_its_directory(tmp_path, tiny, fake_libero, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    compare = ["compare", "--suite", "libero_object", "--tasks", "0", "--strategies", "random",
               "--model", tiny, "-o", str(out)]
    assert main(compare) == 2
    [line] = error_lines(capsys)
    assert str(out) in line and "not empty" in line
    assert main(compare + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["none.json", "notes.txt", "random.json"]
    assert (out / "notes.txt").read_text() == "mine" and read_eval_results(out / "random.json").complete
    (tmp_path / "file").write_text("mine")
    assert main(compare[:-1] + [str(tmp_path / "file")]) == 2
    [line] = error_lines(capsys)
    assert "file" in line and "give a directory" in line


def test_check_oft_has_overwrite(tmp_path, capsys):
    from prunebench.models.oft_tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny-oft", seed=0)
    out = tmp_path / "check.json"
    out.write_text("mine")
    check = ["check-oft", str(checkpoint), "--suite", "libero_spatial", "--synthetic", "--device", "cpu",
             "--reference", "adapter", "--observations", "1", "--tolerance", "1e-5", "-o", str(out)]
    assert main(check) == 2 and out.read_text() == "mine"
    assert main(check + ["--overwrite"]) == 0 and json.loads(out.read_text())["passed"]


def test_study_export_and_plot_refuse_existing_outputs_before_any_work(tmp_path, monkeypatch, capsys):
    from tests.test_study import write_definition

    definition = write_definition(tmp_path)
    table = []

    def fake_table(defn):
        table.append(defn.name)
        return pd.DataFrame({"strategy": ["random"], "trial": [0]})

    monkeypatch.setattr("prunebench.cli.study._table", fake_table)
    out = tmp_path / "t.csv"
    out.write_text("mine")
    assert main(["study", "export", definition, "-o", str(out)]) == 2
    assert out.read_text() == "mine" and not table
    assert main(["study", "export", definition, "-o", str(tmp_path)]) == 2
    assert main(["study", "export", definition, "-o", str(out), "--overwrite"]) == 0
    assert out.read_text().splitlines() == ["strategy,trial", "random,0"]
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "pareto_front.png").write_text("mine")
    table.clear()
    assert main(["plot", definition, "-o", str(plots)]) == 2 and not table
    lines = error_lines(capsys)
    assert len(lines) == 3 and "exists" in lines[0] and "is a directory" in lines[1]
    assert str(plots) in lines[2] and "not empty" in lines[2]


def test_demos_resume_a_dataset_but_never_write_over_other_files(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("prunebench.training.demos.generate", lambda cfg, out: calls.append(out) or {"tasks": {}})
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"lr": 1}')
    assert main(["demos", "--tasks", "0", "-o", str(folder)]) == 2
    [line] = error_lines(capsys)
    assert str(folder) in line and "no demo dataset" in line
    assert (folder / "config.json").read_text() == '{"lr": 1}' and not calls
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "config.json").write_text('{"suite": "libero_object", "per_task": 2}')
    assert main(["demos", "--tasks", "0", "-o", str(dataset)]) == 0  # resumed
    assert main(["demos", "--tasks", "0", "-o", str(tmp_path / "new")]) == 0
    assert calls == [dataset, tmp_path / "new"]


# --------------------------------------------------------------------------- bad paths
@pytest.mark.parametrize("where, reason", [
    ("{tmp}", "it is a directory"),
    ("{tmp}/a_file/r.json", "a_file is a file, not a folder"),
    ("{tmp}/a_file/sub/r.json", "a_file is a file, not a folder"),
])
def test_an_invalid_output_path_is_one_line_before_any_work(tmp_path, tiny, monkeypatch, capsys, where,
                                                            reason):
    (tmp_path / "a_file").write_text("mine")
    no_work(monkeypatch)
    path = where.format(tmp=tmp_path)
    assert stream_run(tiny, "-o", path) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: cannot write {path}: ") and reason in line
    assert (tmp_path / "a_file").read_text() == "mine"


def test_an_output_in_a_read_only_folder_is_one_line_before_any_work(tmp_path, tiny, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the OS answer as it does to a user
        real = os.open

        def refusing(path, flags, *args, **kwargs):
            if Path(path).parent == folder and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing)
    no_work(monkeypatch)
    try:
        assert stream_run(tiny, "-o", str(folder / "r.json")) == 2
        [line] = error_lines(capsys)
        assert line == f"error: cannot write {folder / 'r.json'}: Permission denied"
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- failed writes mid-run
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_or_read_only_folder_mid_run_keeps_the_finished_episodes(
        tmp_path, tiny, fake_libero, monkeypatch, capsys, code):
    out = tmp_path / "out" / "r.json"
    real, writes = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == out:
            writes.append(dst)
            if len(writes) == 4:  # the start, episodes 1 and 2, then the disk is full
                raise OSError(code, os.strerror(code))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["run", "--suite", "libero_object", "--tasks", "0", "--episodes", "3", "--max-steps", "16",
                 "--strategy", "random", "--model", tiny, "-o", str(out)]) == 1
    [line] = error_lines(capsys)
    assert line == f"error: cannot write {out}: {os.strerror(code)}; what it held before is intact"
    saved = read_eval_results(out)
    assert len(saved.episodes) == 2 and not saved.complete
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left


# --------------------------------------------------------------------------- file mode
def test_results_files_honour_the_umask(tmp_path, tiny):
    before = os.umask(0o022)
    try:
        assert stream_run(tiny, "-o", str(tmp_path / "r.json")) == 0
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_json(tmp_path / "r.json", read_results(tmp_path / "r.json"))
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(before)
