import textwrap

import optuna
import pytest

import prunebench
from prunebench.contract.errors import PluginError
from prunebench.plugins.manager import MANAGER, PluginManager
from tests.helpers import StrategyPlugin

BASELINES = {"none", "random", "downsample", "fastv", "specprune-vla", "vla-pruner", "adp", "divprune",
             "lightvla-free", "sparsevlm"}


def test_builtins_register_through_the_hook():
    assert BASELINES <= set(MANAGER.strategies())
    rows = {r["name"]: r for r in MANAGER.plugins()}
    assert rows["prunebench.strategies.random"]["hooks"] == ["prunebench_register_strategies"]
    assert rows["prunebench.strategies.fastv"]["strategies"] == ["fastv"]


def write_fake_distribution(root, module: str, body: str, dist="prunebench-fake"):
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[prunebench]\nfake = {module}\n")


FAKE = """
    import prunebench, torch

    class Keep3(prunebench.Strategy):
        name = "keep-three"
        def schedule(self, ctx):
            return prunebench.PrunePlan((prunebench.Stage(prunebench.BEFORE_LLM, prunebench.Budget(keep_count=3)),))
        def score(self, stage, signals, ctx):
            return torch.arange(ctx.layout.n_visual, dtype=torch.float)

    @prunebench.hookimpl
    def prunebench_register_strategies(register):
        register(Keep3)
"""


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    write_fake_distribution(tmp_path, "fake_prune_plugin", FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_third_party_plugin_is_discovered_through_entry_point(fake_dist, monkeypatch, engine, obs):
    monkeypatch.delenv("PRUNEBENCH_LOAD_PLUGINS")
    pm = PluginManager()
    assert "keep-three" in pm.strategies()
    row = next(r for r in pm.plugins() if r["name"] == "fake")
    assert row["version"] == "1.2.3" and row["distribution"] == "prunebench-fake" and not row["builtin"]
    out = engine.query(pm.create("keep-three"), obs)
    # keep_count=3 split over two 16-token views -> quotas [2, 1]; scores rise with the index
    assert out.kept["before_llm"].tolist() == [14, 15, 31]


def test_allow_and_block_lists(fake_dist, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_LOAD_PLUGINS", "")
    assert "keep-three" not in PluginManager().strategies()
    monkeypatch.setenv("PRUNEBENCH_LOAD_PLUGINS", "prunebench-fake")
    assert "keep-three" in PluginManager().strategies()
    monkeypatch.delenv("PRUNEBENCH_LOAD_PLUGINS")
    monkeypatch.setenv("PRUNEBENCH_DISABLED_PLUGINS", "fake")
    assert "keep-three" not in PluginManager().strategies()


def test_a_plugin_that_fails_to_import_is_skipped_with_one_warning(tmp_path, monkeypatch, capsys):
    write_fake_distribution(tmp_path, "broken_plugin", "raise ImportError('no such thing')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PRUNEBENCH_LOAD_PLUGINS")
    pm = PluginManager()
    assert {"none", "random"} <= set(pm.strategies())  # unrelated strategies still work
    pm.strategies()
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "plugin 'fake' skipped: prunebench-fake 1.2.3 failed to import: " \
        "ImportError: no such thing" in warning[0] and "PRUNEBENCH_DISABLED_PLUGINS" in warning[0]
    row = next(r for r in pm.plugins() if r["name"] == "fake")
    assert "ImportError: no such thing" in row["broken"]
    with pytest.raises(PluginError, match="unknown strategy 'keep-three'.*plugin 'fake', which may "
                                          "provide it, was skipped: .*ImportError"):
        pm.create("keep-three")
    monkeypatch.setenv("PRUNEBENCH_DISABLED_PLUGINS", "fake")
    PluginManager().strategies()
    assert capsys.readouterr().err == ""


def test_plugins_command_lists_a_broken_plugin(tmp_path, monkeypatch, capsys):
    from prunebench.cli.main import main
    from prunebench.plugins import manager as plugins

    write_fake_distribution(tmp_path, "broken_plugin", "raise ImportError('no such thing')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PRUNEBENCH_LOAD_PLUGINS")
    monkeypatch.setattr(plugins, "MANAGER", PluginManager())
    assert main(["plugins"]) == 0
    assert "fake  BROKEN: prunebench-fake 1.2.3 failed to import: ImportError: no such thing" in \
        capsys.readouterr().out


def test_the_dense_baseline_is_core_not_a_plugin(monkeypatch):
    """Blocking every built-in plugin leaves the dense baseline; no plugin may take its name."""
    from prunebench.plugins.dense import Dense

    monkeypatch.setenv("PRUNEBENCH_DISABLED_PLUGINS", ",".join(
        ["strategies.none", "prunebench.strategies.random", "prunebench.strategies.fastv"]))
    pm = PluginManager()
    assert pm.get("none") is Dense and "random" not in pm.strategies()

    class FakeDense(prunebench.Strategy):
        name = "none"

    with pytest.raises(PluginError, match="'none' is registered twice"):
        manager_with(StrategyPlugin(FakeDense), "impostor").strategies()


def manager_with(plugin, name: str) -> PluginManager:
    """A fresh manager with the built-ins loaded and ``plugin`` registered as ``name``."""
    pm = PluginManager()
    pm.load()
    pm.register(plugin, name=name)
    return pm


class Impostor(prunebench.Strategy):
    name = "random"



def test_duplicate_strategy_names_name_both_plugins():
    pm = manager_with(StrategyPlugin(Impostor), "impostor")
    with pytest.raises(PluginError, match="'random' is registered twice: by plugin '.*' and by plugin '.*'"):
        pm.strategies()


def test_misspelled_hook_is_an_error():
    class Misspelled:
        @prunebench.hookimpl
        def prunebench_register_strategy(self, register):  # missing the final "s"
            pass

    pm = PluginManager()
    pm.load()
    with pytest.raises(PluginError, match="plugin 'typo'.*misspelled hook"):
        pm.register(Misspelled(), name="typo")
    assert pm.pm.get_plugin("typo") is None


def test_registering_a_non_strategy_is_an_error():
    pm = manager_with(StrategyPlugin(dict), "not-a-strategy")
    with pytest.raises(PluginError, match="plugin 'not-a-strategy' registered .* not a prunebench.Strategy"):
        pm.strategies()


def test_unknown_strategy_and_bad_config_fields():
    with pytest.raises(PluginError, match="unknown strategy 'radnom'; installed: .*random"):
        MANAGER.get("radnom")
    with pytest.raises(PluginError, match="strategy 'random': config field 'keep_ration'"):
        MANAGER.create("random", {"keep_ration": 0.5})
    with pytest.raises(PluginError, match="strategy 'fastv': config field 'keep_ratio'"):
        MANAGER.create("fastv", {"keep_ratio": 1.5})
    with pytest.raises(PluginError, match="field 'rows'"):
        MANAGER.create("fastv", {"rows": "diagonal"})


@pytest.mark.parametrize("name", sorted({"none", *MANAGER.builtin_strategies()}))
def test_search_space_maps_a_trial_to_a_valid_config(name):
    from prunebench.study.space import SearchTrial

    cls = MANAGER.get(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    config = cls.Config.search_space(SearchTrial(trial, {}, {}, n_layers=4))  # as a study calls it
    assert isinstance(config, cls.Config)
    # every searched parameter names the config field it sets (tuple fields: field_part)
    fields = cls.Config.model_fields
    assert all(any(p == f or p.startswith(f + "_") for f in fields) for p in trial.params), trial.params


def test_documented_example_plugin_runs(engine, obs, monkeypatch):
    """docs/plugins/example-plugin is a working third-party strategy."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "docs/plugins/example-plugin"))
    import prunebench_keep_centre

    pm = manager_with(prunebench_keep_centre, "keep_centre")
    out = engine.query(pm.create("keep-centre", {"keep_ratio": 0.25}), obs)
    kept = out.kept["before_llm"].tolist()
    assert kept == [5, 6, 9, 10, 21, 22, 25, 26]  # the central 2x2 of each 4x4 view


# --------------------------------------------------------------------------- --plugin FILE|MODULE
MINE = """
    import prunebench, torch

    class Mine(prunebench.Strategy):
        \"\"\"Keeps the first half of each view's tokens.\"\"\"
        name = "mine"
        def schedule(self, ctx):
            return prunebench.PrunePlan((prunebench.Stage(prunebench.BEFORE_LLM, prunebench.Budget(keep_ratio=0.5)),))
        def score(self, stage, signals, ctx):
            return -torch.arange(ctx.layout.n_visual, dtype=torch.float)

    @prunebench.hookimpl
    def prunebench_register_strategies(register):
        register(Mine)
"""


@pytest.fixture
def fresh_manager(monkeypatch):
    """A fresh global manager and no PRUNEBENCH_PLUGIN_FILES: nothing leaks into other tests."""
    from prunebench.plugins import manager as plugins

    monkeypatch.delenv(plugins.PLUGIN_FILES, raising=False)
    pm = PluginManager()
    monkeypatch.setattr(plugins, "MANAGER", pm)
    return pm


@pytest.fixture
def mine(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent(MINE))
    return path


def test_run_with_a_plugin_file(fresh_manager, mine, tiny_path, tmp_path, capsys):
    import os

    from prunebench.cli.main import main
    from prunebench.evaluation.results import read_results

    out = tmp_path / "r.json"
    assert main(["run", "--plugin", str(mine), "--strategy", "mine", "--queries", "2", "--model", tiny_path,
                 "-o", str(out)]) == 0
    results = read_results(out)
    assert results.strategy.name == "mine" and results.strategy.plugin == str(mine)
    assert results.summary.n_queries == 2
    assert "PRUNEBENCH_PLUGIN_FILES" not in os.environ  # set for the command (its workers) only
    assert capsys.readouterr().out.startswith("mine: 2 queries")


@pytest.mark.parametrize("as_module", [False, True], ids=["file", "module"])
def test_plugins_command_lists_a_plugin_file_or_module(fresh_manager, mine, monkeypatch, capsys, as_module):
    from prunebench.cli.main import main

    if as_module:
        monkeypatch.syspath_prepend(str(mine.parent))
        monkeypatch.delitem(__import__("sys").modules, "mine", raising=False)
    spec = "mine" if as_module else str(mine)
    assert main(["plugins", "--plugin", spec]) == 0
    out = capsys.readouterr().out
    assert f"{spec}  ({'module' if as_module else 'file'} plugin)\n    hooks: prunebench_register_strategies\n" \
           "    strategy mine: positions=original  Keeps the first half" in out
    row = next(r for r in fresh_manager.plugins() if r["name"] == spec)
    assert row["strategies"] == ["mine"] and row["distribution"] is None and not row["builtin"]


def test_plugin_files_in_the_environment_register_in_a_new_process_manager(mine, monkeypatch):
    """What a worker process does: PRUNEBENCH_PLUGIN_FILES (set by --plugin) loads the same plugins."""
    from prunebench.plugins.manager import PLUGIN_FILES

    monkeypatch.setenv(PLUGIN_FILES, str(mine))
    pm = PluginManager()
    assert pm.strategies()["mine"].plugin == str(mine)
    assert pm.load_plugin(str(mine)) == str(mine) and pm.load_plugin(str(mine)) == str(mine)  # idempotent
    assert pm.create("mine").name == "mine"


@pytest.mark.parametrize("body, message", [
    (None, "plugin '{spec}': no such file"),
    ("import no_such_module_anywhere\n", "plugin '{spec}' failed to import: ModuleNotFoundError: No module "
                                         "named 'no_such_module_anywhere'"),
    ("def broken(:\n", "plugin '{spec}' failed to import: SyntaxError: "),
    ("x = 1\n", "plugin '{spec}' implements no prunebench hook"),
    ("import prunebench\n\nclass R(prunebench.Strategy):\n    name = 'random'\n\n@prunebench.hookimpl\n"
     "def prunebench_register_strategies(register):\n    register(R)\n",
     "strategy name 'random' is registered twice: by plugin 'prunebench.strategies.random' and by plugin "
     "'{path}'"),
], ids=["missing", "import-error", "syntax-error", "no-hook", "name-clash"])
def test_a_bad_plugin_file_is_one_line_and_exit_2(fresh_manager, tmp_path, capsys, body, message):
    from prunebench.cli.main import main

    path = tmp_path / "bad.py"
    if body is not None:
        path.write_text(body)
    spec = str(path)
    assert main(["run", "--plugin", spec, "--strategy", "mine", "--queries", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: " + message.format(spec=spec, path=path.resolve())), err


def test_a_plugin_module_that_does_not_import_is_one_line(fresh_manager, capsys):
    from prunebench.cli.main import main

    assert main(["validate", "run.yaml", "--plugin", "no_such_plugin_module"]) == 2
    assert capsys.readouterr().err == ("error: plugin 'no_such_plugin_module' failed to import: "
                                       "ModuleNotFoundError: No module named 'no_such_plugin_module'\n")


@pytest.mark.libero
def test_a_plugin_file_reaches_the_worker_processes(fresh_manager, mine, tmp_path, capsys):
    """Closed loop with two spawned workers: each registers the file from PRUNEBENCH_PLUGIN_FILES."""
    from prunebench.cli.main import main
    from prunebench.evaluation.libero_env import libero_available
    from prunebench.evaluation.results import EvalResults

    if not libero_available():
        pytest.skip("LIBERO not installed")
    out = tmp_path / "mine.json"
    code = main(["run", "--plugin", str(mine), "--suite", "libero_object", "--tasks", "0", "--episodes", "2",
                 "--workers", "2", "--strategy", "mine", "--render-quality", "fast", "--fast-reset",
                 "--max-steps", "16", "--no-dense-reference", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    saved = EvalResults.model_validate_json(out.read_text())
    assert saved.strategy.plugin == str(mine) and len(saved.episodes) == 2
    assert all(e.error is None and e.steps > 0 for e in saved.episodes)
