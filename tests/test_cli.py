import json

from prunebench.cli.main import main
from prunebench.evaluation.results import read_results
from prunebench.plugins.manager import MANAGER


def test_plugins_lists_the_baselines_and_the_paper_methods(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("none", "random", "downsample", "fastv", "specprune-vla", "vla-pruner", "adp", "divprune"):
        assert f"strategy {name}:" in out


def test_validate_good_and_bad_configs(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("strategy: fastv\nconfig:\n  keep_ratio: 0.3\n  rows: text\n")
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: fastv\nconfig:\n  keep_ratio: 0.3\n  rowz: text\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rowz" in err and "fastv" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("stratgy: fastv\n")
    assert main(["validate", str(typo)]) == 2
    assert "stratgy" in capsys.readouterr().err


def test_run_writes_results_with_config_seed_and_versions(tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--strategy", "random", "--set", "keep_ratio=0.25", "--queries", "3",
                 "--seed", "4", "-o", str(out)]) == 0
    results = read_results(out)
    assert results.seed == 4 and results.strategy.config["keep_ratio"] == 0.25
    assert results.attention_backend == "sdpa" and results.summary.n_queries == 3
    versions = results.environment["versions"]
    for key in ("torch", "transformers", "mujoco", "libero", "prunebench"):
        assert key in versions
    assert versions["torch"].startswith("2.")
    first = results.queries[0]
    assert first.stages[0].visual_after == round(0.25 * 128)  # 2 views x 8 x 8 patches


def test_run_same_seed_same_actions(tmp_path):
    paths = [tmp_path / f"{i}.json" for i in range(2)]
    for p in paths:
        main(["run", "--strategy", "random", "--queries", "2", "--seed", "1", "-o", str(p)])
    a, b = (json.loads(p.read_text())["queries"] for p in paths)
    assert [q["tokens_per_layer"] for q in a] == [q["tokens_per_layer"] for q in b]


def test_unknown_strategy_is_one_line_error(capsys):
    assert main(["run", "--strategy", "nope", "--queries", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown strategy 'nope'") and err.count("\n") == 1


def test_compare_prints_a_table(capsys, tmp_path):
    assert main(["compare", "--queries", "2", "-o", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "FLOPs-ideal" in out and "fastv" in out
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert {r["strategy"] for r in rows} == {"none", *MANAGER.builtin_strategies()}
    assert {"random", "fastv", "specprune-vla", "vla-pruner", "adp", "divprune"} <= {r["strategy"] for r in rows}


def test_a_closed_pipe_stops_quietly():
    """`prunebench plugins | head -1`: the reader goes away; no traceback, the shell's SIGPIPE code."""
    import subprocess
    import sys

    run = subprocess.Popen([sys.executable, "-m", "prunebench.cli.main", "plugins"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.close()  # before the command writes anything: its first write meets a closed pipe
    err = run.stderr.read().decode()
    assert run.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
