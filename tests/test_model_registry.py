"""The model contract (prunebench.VLAModel) and model families added through the
``prunebench_register_models`` hook, the way a third party would add pi0 or plain OpenVLA."""

import numpy as np
import pytest
import torch

import prunebench
from prunebench.cli.main import main
from prunebench.contract.errors import PluginError, PrunebenchError
from prunebench.contract.model import DecoderConfig, DecoderLayer, DecoderStack, ModelShape, missing_members
from prunebench.engine.loop import PruningEngine
from prunebench.evaluation.results import read_results
from prunebench.models import load_model, model_families
from prunebench.models.mini_oft import MiniOFT
from prunebench.plugins.manager import MANAGER
from tests.conftest import TINY


class ToyModels:
    """A third-party plugin adding the model family "toy": sources ``toy:<anything>`` load a small
    randomly initialised MiniOFT."""

    def __init__(self, families=None):
        self.loaded = []
        self.families = families

    @prunebench.hookimpl
    def prunebench_register_models(self):
        if self.families is not None:
            return self.families
        return [prunebench.ModelFamily("toy", claims=lambda s: s is not None and s.startswith("toy:"),
                                       load=self.load, description="toy:<name>, a tiny random MiniOFT")]

    def load(self, source, *, seed, suite, device):
        self.loaded.append((source, seed, suite, device))
        return MiniOFT.random(TINY, seed=seed).to(device), {"source": source or "toy:default", "trained": True}


@pytest.fixture
def plugin_registered():
    """Registers a plugin object on the global manager for one test only."""
    names = []

    def register(plugin, name="test-toy-models"):
        MANAGER.register(plugin, name=name)
        names.append(name)
        return plugin

    yield register
    for name in names:
        if MANAGER.pm.get_plugin(name) is not None:
            MANAGER.unregister(name)


@pytest.fixture
def toy(plugin_registered):
    return plugin_registered(ToyModels())


def test_a_plugins_family_loads_its_sources(toy):
    model, info = load_model("toy:anything", seed=3)
    assert toy.loaded == [("toy:anything", 3, None, "cpu")]
    assert isinstance(model, MiniOFT) and model.cfg == TINY and info["source"] == "toy:anything"
    assert isinstance(model, prunebench.VLAModel)
    # the built-in families still load theirs, and plugins are asked first
    names = [f.name for f in model_families()]
    assert names[0] == "toy" and names[-2:] == ["openvla-oft", "mini-oft"]
    assert load_model()[1]["source"] != "toy:anything" and len(toy.loaded) == 1


def test_a_plugins_model_runs_through_the_engine(toy, obs):
    model, _ = load_model("toy:x")
    engine = PruningEngine(model, record_kept=True)
    dense = engine.query(MANAGER.create("none"), obs)
    assert np.abs(dense.actions - model.predict(obs).numpy()).max() < 1e-5
    pruned = engine.query(MANAGER.create("random", {"keep_ratio": 0.5}), obs)
    n_visual = model.layout_for(1).n_visual
    assert pruned.actions.shape == (TINY.chunk, TINY.action_dim)
    assert pruned.kept["before_llm"].numel() == n_visual // 2


def test_a_plugins_model_runs_from_the_command_line(toy, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--model", "toy:x", "--strategy", "random", "--queries", "2", "-o", str(out)]) == 0
    results = read_results(out)
    assert results.model["source"] == "toy:x" and results.summary.n_queries == 2
    assert toy.loaded[0][0] == "toy:x"


def test_a_source_no_family_claims_is_one_line_naming_it_and_the_families(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--model", "toy:x", "--strategy", "random", "--queries", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'toy:x'" in err and "mini-oft" in err and "openvla-oft" in err
    assert not out.exists()
    with pytest.raises(PrunebenchError, match="no model family loads it"):
        load_model("toy:x")  # the test plugin above was unregistered with its test


def test_a_plugin_may_claim_the_default_model(plugin_registered):
    toy = ToyModels()
    family = prunebench.ModelFamily("my-default", claims=lambda s: s is None, load=toy.load)
    plugin_registered(ToyModels([family]))
    model, info = load_model(seed=2)
    assert toy.loaded == [(None, 2, None, "cpu")] and info["source"] == "toy:default"


def test_builtin_models_implement_the_protocol(tiny_model):
    from prunebench.models.oft_tiny import build_tiny_oft

    oft = build_tiny_oft(seed=0)
    for model in (tiny_model, oft):
        assert isinstance(model, prunebench.VLAModel)
        assert missing_members(model) == []  # structurally, on every Python version
        assert missing_members(model.cfg, ModelShape) == []
        assert missing_members(model.llm, DecoderStack) == []
        assert missing_members(model.llm.config, DecoderConfig) == []
        assert missing_members(model.llm.layers[0], DecoderLayer) == []
        assert model.n_layers == len(model.llm.layers)
    assert not isinstance(object(), prunebench.VLAModel)
    assert not isinstance(torch.nn.Linear(2, 2), prunebench.VLAModel)
    assert {"encode", "head", "llm", "cfg", "unnormalize_actions"} <= set(missing_members(object()))


def test_a_family_returning_no_model_is_a_plugin_error(plugin_registered):
    bad = prunebench.ModelFamily("linear", claims=lambda s: s == "linear",
                                 load=lambda s, **kw: (torch.nn.Linear(2, 2), {"source": s, "trained": False}))
    plugin_registered(ToyModels([bad]))
    with pytest.raises(PluginError, match=r"'linear' returned a Linear, which lacks .*encode.*head"):
        load_model("linear")


def test_bad_registrations_are_plugin_errors_naming_the_plugin(plugin_registered):
    clash = prunebench.ModelFamily("mini-oft", claims=lambda s: False, load=lambda s, **kw: None)
    plugin_registered(ToyModels([clash]), name="test-clash")
    with pytest.raises(PluginError, match="'mini-oft' is registered twice: by plugin 'test-clash' and by "
                                          "plugin 'prunebench.models.builtin'"):
        load_model()
    MANAGER.unregister("test-clash")
    plugin_registered(ToyModels(["not a family"]), name="test-bad")
    with pytest.raises(PluginError, match="plugin 'test-bad': prunebench_register_models must return"):
        load_model()


def test_plugins_command_lists_a_model_plugin(toy, capsys):
    load_model("toy:x")  # registers the built-in model plugin too
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "test-toy-models" in out and "prunebench_register_models" in out
    assert "strategy random:" in out
    rows = {r["name"]: r for r in MANAGER.plugins()}
    assert rows["prunebench.models.builtin"]["hooks"] == ["prunebench_register_models"]
    assert rows["test-toy-models"]["strategies"] == []
