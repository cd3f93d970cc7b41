import pytest
import torch

from prunebench.models import load_model
from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig, _from_unit, _to_unit
from prunebench.models.tokenizer import WordTokenizer
from tests.conftest import TINY


def test_save_load_round_trip(tmp_path, tiny_model, obs):
    tiny_model.action_q01.fill_(-2.0)
    path = tmp_path / "m.safetensors"
    tiny_model.save(path)
    loaded, info = load_model(path)
    assert info["trained"] and len(info["sha256"]) == 64
    assert loaded.cfg == TINY
    assert torch.equal(loaded.predict(obs), tiny_model.predict(obs))
    tiny_model.action_q01.fill_(-1.0)


@pytest.mark.parametrize("suite", ["libero_object", "libero_spatial", "libero_goal"])
def test_shipped_policy_loads_offline_with_its_normalisation_and_card(suite):
    import json
    from pathlib import Path

    from safetensors import safe_open

    from prunebench.models import builtin_weights

    path = builtin_weights(suite)
    assert path.name == f"mini_oft_{suite}.safetensors" and path.stat().st_size <= 10 * 2**20
    model, info = load_model(suite=suite)
    assert info["trained"] and info["source"] == str(path)
    learned = (model.action_q99 != model.action_q01).tolist()
    assert learned == [True, True, True, False, False, False, True]  # rotation neutral (never used)
    assert (model.proprio_q99 == model.proprio_q01).tolist()[3:6] == [True] * 3
    with safe_open(str(path), "pt") as f:
        training = json.loads(f.metadata()["extra"])["training"]
    assert training["complete"] and training["demos"] >= 400
    card = (Path(__file__).parents[1] / "docs" / "policy.md").read_text()
    assert info["sha256"] in card  # the model card describes exactly this file


def test_same_seed_same_weights():
    a, b = MiniOFT.random(TINY, seed=5), MiniOFT.random(TINY, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_normalisation_is_neutral_on_constant_dimensions():
    q01, q99 = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 4.0])
    unit = _to_unit(torch.tensor([0.5, 0.0, 5.0]), q01, q99)
    assert unit.tolist() == [0.5, 0.0, 1.0]  # constant dim -> 0, out of range -> clipped
    assert _from_unit(torch.tensor([0.5, 0.7, 1.0]), q01, q99).tolist() == [0.5, 0.0, 4.0]


def test_prompt_template_matches_oft_shape():
    tok = WordTokenizer()
    ids = tok.prompt_ids("pick up the alphabet soup and place it in the basket")
    assert tok.head_len == 9 and tok.tail_len == 3
    assert tok.unk not in ids and len(ids) == 9 + 11 + 3


def test_default_size_has_enough_visual_tokens():
    cfg = MiniOFTConfig()
    assert cfg.grid ** 2 >= 64


def test_missing_view_is_a_clear_error(tiny_model, obs):
    del obs.images["wrist"]
    with pytest.raises(ValueError, match="lacks view"):
        tiny_model.encode(obs)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="patch_size"):
        MiniOFTConfig(image_size=30, patch_size=8)



def test_each_suite_gets_its_own_shipped_weights(tmp_path, monkeypatch):
    """--suite picks the suite's weights (LIBERO-PRO variants their base suite's); a suite without
    weights is one clear error, never another suite's policy."""
    from prunebench.contract.errors import PrunebenchError
    from prunebench.models import builtin
    from prunebench.models.builtin import builtin_weights, shipped_suites

    for suite in ("libero_object", "libero_spatial", "libero_spatial_extra"):
        (tmp_path / f"mini_oft_{suite}.safetensors").write_bytes(b"x")
    monkeypatch.setattr(builtin, "weights_folder", lambda: tmp_path)
    assert shipped_suites() == ["libero_object", "libero_spatial", "libero_spatial_extra"]
    assert builtin_weights().name == "mini_oft_libero_object.safetensors"
    assert builtin_weights("libero_spatial").name == "mini_oft_libero_spatial.safetensors"
    assert builtin_weights("libero_object_swap").name == "mini_oft_libero_object.safetensors"
    assert builtin_weights("libero_spatial_extra_lan").name == "mini_oft_libero_spatial_extra.safetensors"
    with pytest.raises(PrunebenchError, match="--suite libero_goal: .*libero_object, libero_spatial"):
        builtin_weights("libero_goal")


def _film_model(seed: int = 0, **paths) -> MiniOFT:
    """A tiny model with the instruction paths (default FiLM) whose zero-initialised projections
    have been given random weights."""
    model = MiniOFT.random(TINY.model_copy(update=paths or {"film": True}), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        # only the instruction paths' projections (the LLM's q/k/v/o and MLP projections keep
        # their initialisation)
        if name.endswith("proj.weight") and (".film." in name or name.startswith("slot_conditioning.")):
            p.data = torch.randn(p.shape, generator=gen) * 0.5
    return model


def _slots(model, obs):
    enc = model.encode(obs)
    return enc.embeds[0, enc.layout.row_slots("action")]


def _visual(model, obs):
    enc = model.encode(obs)
    return enc.embeds[0, enc.layout.visual_slots()]


def test_film_makes_visual_tokens_depend_on_the_instruction(tmp_path, obs):
    from tests.conftest import make_observation

    other = make_observation(instruction="put the bowl on the stove")
    plain = MiniOFT.random(TINY, seed=0)
    assert torch.equal(_visual(plain, obs), _visual(plain, other))  # without FiLM: words reach the LLM only
    fresh = MiniOFT.random(TINY.model_copy(update={"film": True}), seed=0)
    assert torch.equal(_visual(fresh, obs), _visual(fresh, other))  # zero-initialised: no modulation yet
    film = _film_model()
    assert not torch.allclose(_visual(film, obs), _visual(film, other))
    path = tmp_path / "film.safetensors"
    film.save(path)
    loaded, _ = load_model(path)
    assert loaded.cfg.film and torch.equal(loaded.predict(other), film.predict(other))


def test_instruction_slots_offset_the_action_slots_by_the_instruction(tmp_path, obs):
    from tests.conftest import make_observation

    other = make_observation(instruction="put the bowl on the stove")
    plain = MiniOFT.random(TINY, seed=0)
    assert torch.equal(_slots(plain, obs), _slots(plain, other))  # the same learned queries for every task
    fresh = MiniOFT.random(TINY.model_copy(update={"instruction_slots": True}), seed=0)
    assert torch.equal(fresh.predict(other), plain.predict(other))  # zero-initialised: the plain model
    slots = _film_model(instruction_slots=True)
    assert not torch.allclose(_slots(slots, obs), _slots(slots, other))
    assert torch.equal(_visual(slots, obs), _visual(slots, other))  # FiLM off: the stem does not hear it
    path = tmp_path / "slots.safetensors"
    slots.save(path)
    loaded, _ = load_model(path)
    assert loaded.cfg.instruction_slots and torch.equal(loaded.predict(other), slots.predict(other))


@pytest.mark.parametrize("paths", [{"film": True}, {"film": True, "instruction_slots": True}])
def test_pruning_engine_runs_an_instruction_conditioned_model_like_its_own_forward(obs, paths):
    from prunebench.engine.loop import PruningEngine
    from prunebench.plugins.manager import MANAGER

    model = _film_model(**paths)
    out = PruningEngine(model).query(MANAGER.create("none"), obs)
    assert torch.allclose(torch.as_tensor(out.actions), model.predict(obs), atol=1e-6)
