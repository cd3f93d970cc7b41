import textwrap

import optuna
import pytest

import prunebench
from prunebench.contract.errors import PluginError
from prunebench.plugins.manager import MANAGER, PluginManager
from tests.helpers import StrategyPlugin

BASELINES = {"none", "random", "downsample", "fastv", "specprune-vla", "vla-pruner", "adp"}


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
    from prunebench.plugins import manager as plugins
    from prunebench.cli.main import main

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


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_search_space_maps_a_trial_to_a_valid_config(name):
    cls = MANAGER.get(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    config = cls.Config.search_space(trial)
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
