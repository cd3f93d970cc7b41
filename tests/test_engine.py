import pytest
import torch

import prunebench
from prunebench import (
    BEFORE_LLM,
    Budget,
    PrunePlan,
    Stage,
    Strategy,
    StrategyConfig,
    StrategyError,
    attention,
    attention_entropy,
    row_embeddings,
    visual_keys,
)
from prunebench.contract.errors import EngineError
from prunebench.contract.layout import ROW_GROUPS
from prunebench.engine.loop import PruningEngine
from prunebench.engine.signals import attention_recomputed, attention_to_visual
from prunebench.engine.transformers_compat import (
    HAS_ATTENTION_REGISTRY,
    attention_scaling,
    forward_bidirectional,
    rotary,
    run_layer,
)
from prunebench.engine.validation import check_tokens
from prunebench.plugins.manager import MANAGER
from tests.conftest import TINY, make_observation
from tests.helpers import FixedPlan, first_k, keep_all

POINTS = list(range(BEFORE_LLM, TINY.n_layers - 1))


def dense(engine, obs):
    return engine.query(MANAGER.create("none"), obs)


def test_engine_dense_loop_equals_model_forward(engine, tiny_model, obs):
    reference = tiny_model.predict(obs)  # LlamaModel.forward, bidirectional through the config
    assert torch.allclose(torch.as_tensor(dense(engine, obs).actions), reference, atol=1e-6)


def test_attention_is_bidirectional(engine, tiny_model, obs):
    """The causal trap (OpenVLA-OFT attends bidirectionally, arXiv 2502.19645): flipping the flag
    must change the actions."""
    bidirectional = dense(engine, obs).actions
    for layer in tiny_model.llm.layers:
        layer.self_attn.is_causal = True
    try:
        causal_model_output = tiny_model.predict(obs)  # config.is_causal stays False -> still bidirectional
        assert torch.allclose(causal_model_output, torch.as_tensor(bidirectional), atol=1e-6)
    finally:
        for layer in tiny_model.llm.layers:
            layer.self_attn.is_causal = False
    enc = tiny_model.encode(obs)
    n = enc.embeds.shape[1]
    causal_mask = torch.full((1, 1, n, n), float("-inf")).triu(1)
    causal = tiny_model.llm(inputs_embeds=enc.embeds, attention_mask=causal_mask).last_hidden_state
    causal_actions = tiny_model.unnormalize_actions(tiny_model.head(causal[:, enc.layout.readout_slots()]))
    assert (causal_actions[0] - torch.as_tensor(bidirectional)).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["original", "recompact"])
@pytest.mark.parametrize("point", POINTS)
def test_keep_everything_reproduces_dense(engine, obs, point, positions):
    out = engine.query(FixedPlan([keep_all(point)], position_ids=positions), obs)
    assert torch.allclose(torch.as_tensor(out.actions), torch.as_tensor(dense(engine, obs).actions), atol=1e-5)


@pytest.mark.parametrize("point", POINTS)
def test_realised_tokens_per_layer_equal_plan(engine, obs, point):
    out = engine.query(FixedPlan([Stage(point)], keep_fn=first_k(5)), obs)
    layout = engine.model.encode(obs).layout
    full, other = layout.length, layout.length - layout.n_visual
    expected = [full if layer <= point else other + 5 for layer in range(TINY.n_layers)]
    assert out.record.tokens_per_layer == expected
    assert out.record.stages[0].visual_after == 5 and out.record.llm_flops < out.record.dense_llm_flops


def test_two_stages_and_keep_set_in_original_indices(engine, obs):
    keep_first = lambda stage, layout: layout.present_visual()[: 20 if stage.after_layer < 1 else 7]
    out = engine.query(FixedPlan([Stage(0), Stage(2)], keep_fn=keep_first), obs)
    assert out.kept["after_layer_0"].tolist() == list(range(20))
    assert out.kept["after_layer_2"].tolist() == list(range(7))
    assert [s.visual_after for s in out.record.stages] == [20, 7]


def test_before_llm_with_original_positions_equals_shortened_sequence(engine, tiny_model, obs):
    keep = torch.tensor([0, 3, 5, 17, 20, 31])
    out = engine.query(FixedPlan([Stage(BEFORE_LLM)], keep_fn=lambda s, l: keep), obs)
    enc = tiny_model.encode(obs)
    layout = enc.layout
    visual = torch.arange(layout.visual_start, layout.visual_start + layout.n_visual)
    slots = torch.tensor([p for p in range(layout.length) if p not in set(visual.tolist())] +
                         (keep + layout.visual_start).tolist()).sort().values
    hidden = forward_bidirectional(tiny_model.llm, enc.embeds[:, slots], position_ids=slots[None])
    layout.keep_slots(slots)
    reference = tiny_model.unnormalize_actions(tiny_model.head(hidden[:, layout.readout_slots()]))[0]
    assert torch.allclose(torch.as_tensor(out.actions), reference, atol=1e-5)
    recompact = engine.query(FixedPlan([Stage(BEFORE_LLM)], keep_fn=lambda s, l: keep,
                                       position_ids="recompact"), obs)
    assert not torch.allclose(torch.as_tensor(recompact.actions), reference, atol=1e-5)


def test_recomputed_attention_matches_eager_weights(tiny_model, obs):
    enc = tiny_model.encode(obs)
    layout, h = enc.layout, enc.embeds
    cos, sin = rotary(tiny_model.llm, h, layout.positions[None])
    layer = tiny_model.llm.layers[1]
    config = tiny_model.llm.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            x = layer.input_layernorm(h)
            if hasattr(tiny_model.llm, "rotary_emb"):
                weights = layer.self_attn(x, position_embeddings=(cos, sin), attention_mask=None,
                                          output_attentions=True)[1]  # 4.44-4.47: eager fallback
            else:  # transformers < 4.44: SDPA falls back to eager for output_attentions, rotary inside
                weights = layer.self_attn(x, attention_mask=None, position_ids=layout.positions[None],
                                          output_attentions=True)[1]
    finally:
        config._attn_implementation = previous
    rows = layout.row_slots("text")
    expected = weights[0][:, rows].mean(dim=(0, 1))[layout.visual_slots()]
    with torch.inference_mode():
        got = attention_to_visual(layer, h, cos, sin, layout, ["text"])["text"]
        entropy = attention_recomputed(layer, h, cos, sin, layout, ["all", "text"], "entropy")
    assert torch.allclose(got, expected, atol=1e-6)
    for group, value in zip(["all", "text"], entropy):  # head mean, then each row's entropy, row mean
        p = weights[0].mean(dim=0)[layout.row_slots(group)]
        assert torch.allclose(value, -(p * torch.log(p + 1e-10)).sum(dim=-1).mean().reshape(1), atol=1e-5)


def test_sdpa_and_eager_backends_agree(obs):
    from prunebench.models.mini_oft import MiniOFT

    sdpa = MiniOFT.random(TINY, seed=3)
    eager = MiniOFT.random(TINY.model_copy(update={"attn_implementation": "eager"}), seed=3)
    a = PruningEngine(sdpa).query(MANAGER.create("none"), obs).actions
    b = PruningEngine(eager).query(MANAGER.create("none"), obs).actions
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=1e-5)


def test_same_seed_same_keep_and_actions(engine, obs):
    strategy = MANAGER.create("random", {"keep_ratio": 0.3})
    a, b = engine.query(strategy, obs, seed=7), engine.query(strategy, obs, seed=7)
    c = engine.query(strategy, obs, seed=8)
    assert torch.equal(a.kept["before_llm"], b.kept["before_llm"])
    assert (a.actions == b.actions).all()
    assert not torch.equal(a.kept["before_llm"], c.kept["before_llm"])


INVALID_KEEP_SETS = [
    (torch.tensor([], dtype=torch.long), "is empty"),
    (torch.tensor([1, 1, 2]), "duplicate"),
    (torch.tensor([0, 999]), "outside the visual tokens"),
    (torch.tensor([-1, 2]), "outside the visual tokens"),
    (torch.tensor([0.5, 1.0]), "integer tensor"),
    ([0, 1], "integer tensor"),
]


@pytest.mark.parametrize("keep, message", INVALID_KEEP_SETS)
def test_invalid_keep_sets_name_the_strategy(engine, obs, keep, message):
    with pytest.raises(StrategyError, match=f"strategy 'fixed-plan'.*{message}"):
        engine.query(FixedPlan([Stage(0)], keep_fn=lambda s, l: keep), obs)


def test_keeping_an_already_removed_token_is_an_error(engine, obs):
    keep = lambda stage, layout: torch.tensor([0, 1]) if stage.after_layer == 0 else torch.tensor([0, 5])
    with pytest.raises(StrategyError, match="already removed"):
        engine.query(FixedPlan([Stage(0), Stage(1)], keep_fn=keep), obs)


@pytest.mark.parametrize("stages, signals, message", [
    ([Stage(TINY.n_layers - 1)], (), "valid: -1"),
    ([Stage(-2)], (), "valid: -1"),
    ([Stage(2), Stage(1)], (), "layer order"),
    ([Stage(1), Stage(1)], (), "layer order"),
    ([], (attention(1, "sideways"),), "rows must be one of"),
    ([], (attention(99),), "out of range"),
])
def test_invalid_plans_name_the_strategy(engine, obs, stages, signals, message):
    with pytest.raises(StrategyError, match=f"strategy 'fixed-plan'.*{message}"):
        engine.query(FixedPlan(stages, signals), obs)


def test_reading_a_signal_before_its_layer_ran_is_an_error(engine, obs):
    class ReadsTooEarly(FixedPlan):
        def score(self, stage, signals, ctx):
            return signals[attention(2)]

    with pytest.raises(StrategyError, match="was not computed"):
        engine.query(ReadsTooEarly([Stage(0)], (attention(2),)), obs)


def test_engine_fails_loudly_when_tokens_do_not_match_plan(engine, obs):
    out = engine.query(FixedPlan([Stage(0)], keep_fn=first_k(3)), obs)
    record = out.record.model_copy(update={"tokens_per_layer": [out.record.tokens_per_layer[0]] * TINY.n_layers})
    with pytest.raises(EngineError, match="differ from the plan"):
        check_tokens(PrunePlan((Stage(0),)), record, engine.model.encode(obs).layout)


@pytest.mark.parametrize("name", ["random", "downsample", "fastv"])
def test_baselines_hit_their_budget(engine, obs, name):
    out = engine.query(MANAGER.create(name, {"keep_ratio": 0.25}), obs)
    n_visual = engine.model.encode(obs).layout.n_visual
    assert out.record.stages[0].visual_after == round(0.25 * n_visual)
    assert out.record.ms["overhead"] > 0 and out.record.ms["total"] >= out.record.ms["llm"]


def test_fastv_keeps_most_attended_tokens(engine, obs):
    """FastV's keep-set equals the top-k of the attention signal it requested."""
    strategy = MANAGER.create("fastv", {"keep_ratio": 0.25, "layer": 1, "rows": "text", "per_view": False})

    captured = {}

    class Spy(type(strategy)):
        def select(self, stage, scores, ctx, layout):
            captured["scores"] = scores
            return super().select(stage, scores, ctx, layout)

    out = engine.query(Spy(strategy.config), obs)
    scores = captured["scores"]
    k = out.record.stages[0].visual_after
    assert set(out.kept["after_layer_1"].tolist()) == set(torch.topk(scores, k).indices.tolist())


def test_different_observations_give_different_actions(engine):
    a = dense(engine, make_observation(1)).actions
    b = dense(engine, make_observation(2)).actions
    assert abs(a - b).max() > 1e-4


# ------------------------------------------------------------------ signals from the layer's own q, k
class RecordsSignals(FixedPlan):
    """Requests attention of every row group at every layer, prunes after layer 0 (so later layers
    see a shortened sequence with gaps in its positions), keeps the signals it saw at the end."""

    def __init__(self, n_layers, signals=None):
        signals = signals or tuple(attention(layer, rows) for layer in range(n_layers) for rows in ROW_GROUPS)
        super().__init__([Stage(0)], signals, keep_fn=lambda s, layout: layout.present_visual()[::3])

    def on_forward_end(self, signals, record):
        self.seen = {key: signals._values[key] for key in signals.keys()}


def _shipped_policy():
    from prunebench.models import load_model

    return load_model()[0]


@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_attention_signals_from_the_layer_equal_the_recomputed_ones(tiny_model, which, monkeypatch):
    import prunebench.engine.loop as engine_module
    import prunebench.engine.signals as signals_module

    model = tiny_model if which == "tiny" else _shipped_policy()
    obs = make_observation(size=model.cfg.image_size)
    observed, recomputed = RecordsSignals(len(model.llm.layers)), RecordsSignals(len(model.llm.layers))
    calls = []
    from_layer = signals_module.attention_from_layer
    monkeypatch.setattr(signals_module, "attention_from_layer", lambda *a: calls.append(1) or from_layer(*a))
    a = PruningEngine(model).query(observed, obs)
    # one observation per layer (all row groups at once); transformers < 4.48 recomputes instead
    assert len(calls) == (len(model.llm.layers) if HAS_ATTENTION_REGISTRY else 0)
    monkeypatch.setattr(engine_module, "HAS_ATTENTION_REGISTRY", False)  # transformers < 4.48
    b = PruningEngine(model).query(recomputed, obs)
    assert observed.seen.keys() == recomputed.seen.keys()
    assert len(observed.seen) == len(model.llm.layers) * len(ROW_GROUPS)
    for key, value in observed.seen.items():
        assert torch.equal(value.isnan(), recomputed.seen[key].isnan()), key
        assert torch.allclose(value, recomputed.seen[key], atol=1e-6, rtol=1e-5, equal_nan=True), key
    assert (a.actions == b.actions).all()


def test_per_row_attention_and_row_embeddings(tiny_model, obs, monkeypatch):
    """Per-row attention: one row per present row token, whose mean is the row-averaged signal, after
    a removal too; the same from the layer and recomputed. Row embeddings: the input's rows."""
    import prunebench.engine.loop as engine_module

    layer = 2  # after the removal at layer 0: a shortened sequence
    wanted = (attention(layer, "text"), attention(layer, "text", per_row=True),
              attention(layer, "prefill", per_row=True), row_embeddings("prompt"), attention_entropy(layer),
              visual_keys(layer))
    seen = []
    for registry in (True, False):
        monkeypatch.setattr(engine_module, "HAS_ATTENTION_REGISTRY", registry and HAS_ATTENTION_REGISTRY)
        strategy = RecordsSignals(TINY.n_layers, wanted)
        PruningEngine(tiny_model).query(strategy, obs)
        seen.append(strategy.seen)
    enc = tiny_model.encode(obs)
    layout = enc.layout
    for values in seen:
        per_row = values[attention(layer, "text", per_row=True).key]
        assert per_row.shape == (layout.row_slots("text").numel(), layout.n_visual)
        assert torch.allclose(per_row.mean(dim=0), values[attention(layer, "text").key], equal_nan=True)
        removed = per_row[:, 1::3].isnan().all() and not per_row[:, ::3].isnan().any()
        assert removed  # RecordsSignals keeps every third visual token after layer 0
        n_removed = layout.n_visual - len(range(0, layout.n_visual, 3))  # prefill rows include the visual
        prefill = values[attention(layer, "prefill", per_row=True).key]
        assert prefill.shape[0] == layout.row_slots("prefill").numel() - n_removed
        assert torch.equal(values[row_embeddings("prompt").key], enc.embeds[0, layout.row_slots("prompt")])
        head_dim = TINY.hidden_size // TINY.n_heads
        keys = values[visual_keys(layer).key]  # from the layer: rotary undone; recomputed: never applied
        assert keys.shape == (layout.n_visual, head_dim) and keys[1::3].isnan().all() and not keys[::3].isnan().any()
    for key, value in seen[0].items():
        assert torch.allclose(value, seen[1][key], atol=1e-6, rtol=1e-5, equal_nan=True), key


@pytest.mark.skipif(not HAS_ATTENTION_REGISTRY, reason="transformers < 4.48 has no attention registry")
def test_observing_a_layer_leaves_the_dense_forward_bit_identical(engine, tiny_model, obs):
    enc = tiny_model.encode(obs)
    h, positions = enc.embeds, enc.layout.positions[None]
    cos, sin = rotary(tiny_model.llm, h, positions)
    seen = []
    with torch.inference_mode():
        for layer in tiny_model.llm.layers:
            plain = run_layer(tiny_model.llm, layer, h, positions, cos, sin)
            observed = run_layer(tiny_model.llm, layer, h, positions, cos, sin,
                                 observe=lambda module, q, k, bias: seen.append(q.shape))
            assert torch.equal(plain, observed)
            h = plain
    assert len(seen) == len(tiny_model.llm.layers)
    assert tiny_model.llm.config._attn_implementation == "sdpa"  # the backend is restored
    every_layer = tuple(attention(layer, "prefill") for layer in range(TINY.n_layers))
    with_signals = engine.query(FixedPlan([], every_layer), obs)
    assert (with_signals.actions == dense(engine, obs).actions).all()


def test_signal_time_inside_a_layer_is_overhead():
    import time

    from prunebench.engine.accounting import StageTimer

    timer = StageTimer()
    with timer("llm"):
        with timer("overhead", moved_from="llm"):
            time.sleep(0.02)
    assert timer.ms["overhead"] >= 20 and timer.ms["llm"] < 10


def test_qk_logits_equal_the_row_by_key_mean(tiny_model, obs):
    """ADP's signal, computed as a mean query row times the visual keys, equals the mean of the
    full rows x keys logits."""
    from prunebench.engine.signals import qk_logits_to_visual

    enc = tiny_model.encode(obs)
    layout, layer = enc.layout, tiny_model.llm.layers[0]
    attn = layer.self_attn
    with torch.inference_mode():
        x = layer.input_layernorm(enc.embeds)
        heads = lambda t: t.view(1, -1, TINY.n_heads, attn.head_dim).transpose(1, 2)
        q, k = heads(attn.q_proj(x[:, layout.row_slots("language")])), heads(attn.k_proj(x))
        logits = (q @ k.transpose(-1, -2)) * attention_scaling(attn)
        expected = logits.mean(dim=(0, 1, 2))[layout.visual_slots()]
        got = qk_logits_to_visual(layer, enc.embeds, layout, "language")
    assert got.shape == (layout.n_visual,) and torch.allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------ checks on and off
def test_debug_checks_follow_the_environment(tiny_model, monkeypatch):
    assert PruningEngine(tiny_model).checks  # tests/conftest.py turns them on
    monkeypatch.delenv("PRUNEBENCH_DEBUG_CHECKS")
    assert not PruningEngine(tiny_model).checks and PruningEngine(tiny_model, checks=True).checks


@pytest.mark.parametrize("keep, message", INVALID_KEEP_SETS)
def test_without_debug_checks_invalid_keep_sets_raise_the_same_errors(tiny_model, obs, keep, message):
    engine = PruningEngine(tiny_model, checks=False)
    with pytest.raises(StrategyError, match=f"strategy 'fixed-plan'.*{message}"):
        engine.query(FixedPlan([Stage(0)], keep_fn=lambda s, l: keep), obs)
    removed = lambda stage, layout: torch.tensor([0, 1]) if stage.after_layer == 0 else torch.tensor([0, 5])
    with pytest.raises(StrategyError, match="already removed"):
        engine.query(FixedPlan([Stage(0), Stage(1)], keep_fn=removed), obs)


def test_valid_keep_sets_give_the_same_result_with_and_without_checks(tiny_model, obs):
    keep = lambda stage, layout: layout.present_visual()[torch.tensor([7, 0, 3, 12, 5])]  # unsorted
    on = PruningEngine(tiny_model, checks=True).query(FixedPlan([Stage(1)], keep_fn=keep), obs)
    off = PruningEngine(tiny_model, checks=False).query(FixedPlan([Stage(1)], keep_fn=keep), obs)
    assert on.kept["after_layer_1"].tolist() == off.kept["after_layer_1"].tolist() == [0, 3, 5, 7, 12]
    assert (on.actions == off.actions).all()


def test_signals_with_grouped_kv_heads():
    """Grouped-query attention (fewer KV heads than query heads): observed = recomputed, and the
    q·k logits fold each query head onto its KV head."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from prunebench.contract.layout import TokenLayout
    from prunebench.engine.signals import attention_from_layer, attention_recomputed, qk_logits_to_visual

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, 0).eval()
    layer.self_attn.is_causal = False
    layout = TokenLayout.build([("a", 2, 3), ("b", 2, 3)], 1, 6, 2, 1, 4)
    h = torch.randn(1, layout.length, 32)
    positions = layout.positions[None]
    table = LlamaRotaryEmbedding(config=config)
    llm = type("LLM", (), {"rotary_emb": table, "layers": [layer]})()
    cos, sin = rotary(llm, h, positions)
    with torch.inference_mode():
        expected = attention_recomputed(layer, h, cos, sin, layout, ["text", "action"])
        if HAS_ATTENTION_REGISTRY:
            seen = []
            observe = lambda m, q, k, bias: seen.append(attention_from_layer(m, q, k, layout, ["text", "action"]))
            run_layer(llm, layer, h, positions, cos, sin, observe=observe)
            assert torch.allclose(seen[0], expected, atol=1e-6)
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x[:, layout.row_slots("language")]).view(1, -1, 4, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, -1, 2, attn.head_dim).transpose(1, 2).repeat_interleave(2, dim=1)
        logits = ((q @ k.transpose(-1, -2)) * attention_scaling(attn)).mean(dim=(0, 1, 2))
        logits = logits[layout.visual_slots()]
        assert torch.allclose(qk_logits_to_visual(layer, h, layout, "language"), logits, atol=1e-6)


class _SeesLayouts(Strategy):
    """Two stages; records what score() and select() see at each."""

    name = "sees-layouts"

    def __init__(self):
        super().__init__(StrategyConfig())
        self.seen = []

    def schedule(self, ctx):
        return PrunePlan((Stage(0, Budget(keep_ratio=0.5)), Stage(1, Budget(keep_ratio=0.25))),
                         (prunebench.attention(0, "text"),))

    def score(self, stage, signals, ctx):
        self.seen.append(("score", stage.after_layer, ctx.current_layout.n_present_visual()))
        return torch.arange(ctx.layout.n_visual, dtype=torch.float32)

    def select(self, stage, scores, ctx, layout):
        present = ctx.current_layout.n_present_visual()
        assert layout.n_present_visual() == present  # select's layout is the one score saw
        assert prunebench.attention(0, "text") in ctx.signals  # select reads signals from ctx
        self.seen.append(("select", stage.after_layer, present))
        return super().select(stage, scores, ctx, layout)


def test_score_and_select_see_the_current_layout_and_the_signals(engine, obs):
    strategy = _SeesLayouts()
    n = engine.model.encode(obs).layout.n_visual
    engine.query(strategy, obs)
    half = round(0.5 * n)
    assert strategy.seen == [("score", 0, n), ("select", 0, n), ("score", 1, half), ("select", 1, half)]


def test_a_stage_without_budget_on_the_default_select_is_a_strategy_error(engine, obs):
    class NoBudget(Strategy):
        name = "no-budget"

        def schedule(self, ctx):
            return PrunePlan((Stage(0),))

        def score(self, stage, signals, ctx):
            return torch.zeros(ctx.layout.n_visual)

    with pytest.raises(StrategyError, match="'no-budget'.*after_layer_0 has no budget"):
        engine.query(NoBudget(), obs)
