"""SparseVLM on hand-computed inputs (raters, scores, rank, counts) and end to end through the engine."""

import math

import numpy as np
import optuna
import pytest
import torch
from pydantic import ValidationError

from prunebench import (
    EMBEDDINGS,
    Observation,
    PrunePlan,
    QueryContext,
    Strategy,
    TokenLayout,
    attention,
    row_embeddings,
)
from prunebench.engine.loop import PruningEngine
from prunebench.engine.signals import visual_embeddings
from prunebench.models import load_model
from prunebench.plugins.manager import MANAGER
from prunebench.strategies.sparsevlm import (
    SparseVLM,
    SparseVLMConfig,
    rank_adapted_count,
    rater_rank,
    rater_scores,
    raters_from_relevance,
    schedule_counts,
    text_relevance,
)
from tests.conftest import make_observation

LN3 = math.log(3.0)
NAN = float("nan")


# ----------------------------------------------------------------------------- raters
def test_text_relevance_and_raters_by_hand():
    # visual token 0 has logits (ln 3, 0, 0, 0) with the 4 text tokens -> softmax (1/2, 1/6, 1/6, 1/6);
    # visual token 1 (0, ln 3, 0, 0) -> (1/6, 1/2, 1/6, 1/6); mean over the visual tokens
    # (1/3, 1/3, 1/6, 1/6), whose mean is 1/4: text tokens 0 and 1 are the raters
    visual = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    r = text_relevance(visual, text)
    assert torch.allclose(r, torch.tensor([1 / 3, 1 / 3, 1 / 6, 1 / 6]))
    assert raters_from_relevance(r).tolist() == [0, 1]
    # the softmax runs over the text tokens of each visual token, not over the visual tokens: with
    # a third visual token (0, 0) -> (1/4, 1/4, 1/4, 1/4) the relevance is the mean of three rows
    r3 = text_relevance(torch.tensor([[LN3, 0.0], [0.0, LN3], [0.0, 0.0]]), text)
    assert torch.allclose(r3, torch.tensor([(1 / 2 + 1 / 6 + 1 / 4) / 3, (1 / 6 + 1 / 2 + 1 / 4) / 3,
                                            (1 / 6 + 1 / 6 + 1 / 4) / 3, (1 / 6 + 1 / 6 + 1 / 4) / 3]))


def test_raters_strictly_above_the_mean_or_at_it():
    r = torch.tensor([0.5, 0.25, 0.25, 0.0])  # mean 0.25
    assert raters_from_relevance(r).tolist() == [0]  # the release: > mean
    assert raters_from_relevance(r, inclusive=True).tolist() == [0, 1, 2]  # VLA-Pruner: >= mean
    flat = torch.full((4,), 0.25)  # nobody above the mean: every candidate rates
    assert raters_from_relevance(flat).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- scores and rank
ROWS = torch.tensor([
    [0.1, 0.2, 0.3, 0.4, NAN],   # a
    [0.3, 0.1, 0.1, 0.1, NAN],   # b
    [0.4, 0.3, 0.4, 0.5, NAN],   # a + b
    [0.2, 0.4, 0.6, 0.8, NAN],   # 2a
])


def test_scores_are_the_mean_of_the_rater_rows():
    s = rater_scores(ROWS, torch.tensor([0, 3]))  # (a + 2a) / 2 = 1.5 a
    assert torch.allclose(s[:4], torch.tensor([0.15, 0.3, 0.45, 0.6]))
    assert math.isnan(s[4])  # an absent visual token stays absent
    s = rater_scores(ROWS, torch.tensor([0, 1, 2]))
    assert torch.allclose(s[:4], torch.tensor([0.8, 0.6, 0.8, 1.0]) / 3)


def test_rank_of_the_rater_attention_to_the_present_tokens():
    present = torch.tensor([0, 1, 2, 3])
    assert rater_rank(ROWS, torch.tensor([0, 1, 2, 3]), present) == 2  # a, b, a + b, 2a
    assert rater_rank(ROWS, torch.tensor([0, 3]), present) == 1  # a, 2a
    assert rater_rank(ROWS, torch.tensor([0, 1]), present) == 2
    # the absent column (NaN) is not part of P; with only the first column left the rank is 1
    assert rater_rank(ROWS, torch.tensor([0, 1]), torch.tensor([0])) == 1


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize("n, ratio, stages, counts", [
    (32, 110 / 576, 3, [18, 10, 6]),  # k = round(6.1) = 6; 32 x 0.1875^(1/3) = 18.3, ^(2/3) = 10.5
    (576, 110 / 576, 3, [332, 191, 110]),  # the release's 192-token row ends at 110 (table: 300, 200)
    (512, 110 / 576, 4, [339, 224, 148, 98]),  # OpenVLA-OFT, the default four layers
    (128, 110 / 576, 3, [73, 42, 24]),  # the shipped policy
    (32, 1.0, 3, [32, 32, 32]),
    (32, 0.01, 2, [6, 1]),  # at least one token
])
def test_geometric_schedule_to_the_final_share(n, ratio, stages, counts):
    assert schedule_counts(n, ratio, stages) == counts


@pytest.mark.parametrize("target, rank, full, final, present, count", [
    (64, 4, 4, 10, 100, 64),   # full rank: the schedule's count
    (64, 2, 4, 10, 100, 32),   # half the rank: half the tokens
    (64, 1, 4, 10, 100, 16),
    (64, 0, 4, 10, 100, 10),   # never below the final count
    (64, 4, 4, 10, 50, 50),    # never above what is present
    (18, 7, 10, 6, 32, 13),    # 12.6 rounds to 13
])
def test_rank_adapted_count(target, rank, full, final, present, count):
    assert rank_adapted_count(target, rank, full, final, present) == count


def hand_context(n_layers=4):
    layout = TokenLayout.build([("a", 2, 2), ("b", 2, 2)], 1, 4, 1, 1, 2)  # 8 visual, 4 prompt tokens
    ctx = QueryContext(observation=Observation({}, np.zeros(8, np.float32), ""), layout=layout, n_layers=n_layers)
    # raters as in the first test: visual tokens 0-3 favour text token 0, 4-7 text token 1 -> {0, 1}
    ctx.signals[EMBEDDINGS] = torch.tensor([[LN3, 0.0]] * 4 + [[0.0, LN3]] * 4)
    ctx.signals[row_embeddings("prompt")] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    return ctx, layout


@pytest.mark.parametrize("second_rater, kept", [
    # independent rater rows: rank 2 = full, the stage keeps the schedule's 4 tokens
    # mean of the two rows (0.05, 0.55, 0, 0, 0.3, 0.15, 0.4, 0): tokens 1, 6, 4, 5
    ([0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0], [1, 4, 5, 6]),
    # the second rater's row is twice the first's: rank 1 of 2, half of 4 tokens; the mean is 1.5 x
    # the first row (0.15, 0.3, 0, 0, 0.9, 0.45, 0, 0): tokens 4, 5
    ([0.2, 0.4, 0.0, 0.0, 1.2, 0.6, 0.0, 0.0], [4, 5]),
])
def test_a_stage_keeps_the_rank_adapted_top_k_of_the_rater_mean(second_rater, kept):
    ctx, layout = hand_context()
    s = MANAGER.create("sparsevlm", {"keep_ratio": 0.25, "layers": (0, 1)})  # k = 2; schedule 4, 2
    plan = s.schedule(ctx)
    assert [st.after_layer for st in plan.stages] == [0, 1] and s.targets == [4, 2]
    first = [0.1, 0.2, 0.0, 0.0, 0.6, 0.3, 0.0, 0.0]
    rows = torch.tensor([first, second_rater, [1.0] * 8, [1.0] * 8])  # rows 2, 3 are no raters
    ctx.signals[attention(0, "prompt", per_row=True)] = rows
    scores = s.score(plan.stages[0], ctx.signals, ctx)
    assert s.raters.tolist() == [0, 1]
    assert torch.allclose(scores, (rows[0] + rows[1]) / 2)
    assert s.ranks[0] == (2 if len(kept) == 4 else 1)
    assert s.select(plan.stages[0], scores, ctx, layout).tolist() == kept
    # without the rank: the schedule's 4
    s = MANAGER.create("sparsevlm", {"keep_ratio": 0.25, "layers": (0, 1), "rank_adaptive": False})
    plan = s.schedule(ctx)
    scores = s.score(plan.stages[0], ctx.signals, ctx)
    assert s.select(plan.stages[0], scores, ctx, layout).numel() == 4 and s.ranks == {}


# ----------------------------------------------------------------------------- configuration
def test_defaults_layers_and_registration():
    c = SparseVLMConfig()
    assert (c.variant, c.keep_ratio, c.layers, c.per_view, c.rater_rows) == (
        "original", 110 / 576, None, False, "prompt")
    s = MANAGER.create("sparsevlm")
    assert s.layers(32) == (2, 6, 15, 19) and s.layers(8) == (1, 2, 4, 5) and s.layers(4) == (0, 1, 2)
    assert MANAGER.create("sparsevlm", {"layers": (1, 9, 2)}).layers(4) == (1, 2)  # sorted, inside
    v = MANAGER.create("sparsevlm", {"variant": "vla-pruner"})
    assert v.layers(32) == (2,) and v.layers(4) == (0,)
    assert s.position_ids == "recompact" and v.position_ids == "original"
    assert MANAGER.get("sparsevlm") is SparseVLM
    assert MANAGER.strategies()["sparsevlm"].plugin == "prunebench.strategies.sparsevlm"
    with pytest.raises(ValidationError):
        SparseVLMConfig(variant="vla-pruner", layers=(2, 6))
    with pytest.raises(ValidationError):
        SparseVLMConfig(layers=())
    assert s.schedule(hand_context(n_layers=1)[0]).is_dense  # no layer with another after it


def test_plugins_command_lists_it(capsys):
    from prunebench.cli.main import main

    assert main(["plugins"]) == 0
    assert "strategy sparsevlm: positions=recompact" in capsys.readouterr().out


def test_search_space():
    from prunebench.study.space import SearchTrial, parameters

    trial = optuna.trial.FixedTrial({"keep_ratio": 0.3, "per_view": True, "rater_rows": "text"})
    config = SparseVLMConfig.search_space(SearchTrial(trial, {}, {}, n_layers=4))
    assert config == SparseVLMConfig(keep_ratio=0.3, per_view=True, rater_rows="text")
    space = parameters("sparsevlm", 32)
    assert space["keep_ratio"] == ("float", [0.05, 1.0])
    assert space["per_view"] == ("categorical", [False, True])


# ----------------------------------------------------------------------------- end to end
class Probe(Strategy):
    """Dense; records the prompt rows' attention at layer 0 (what the first stage scores)."""

    name = "probe"

    def schedule(self, ctx):
        return PrunePlan.dense(signals=(attention(0, "prompt", per_row=True),))

    def on_forward_end(self, signals, record):
        self.rows = signals[attention(0, "prompt", per_row=True)]


def independent_first_stage(engine, obs, count, inclusive=False):
    """Raters from the input embeddings and the top ``count`` of their mean layer-0 attention."""
    enc = engine.model.encode(obs)
    visual = visual_embeddings(enc.embeds, enc.layout).float()
    prompt = enc.embeds[0, enc.layout.row_slots("prompt")].float()
    probs = torch.softmax(visual @ prompt.T, dim=1).mean(0)
    raters = torch.nonzero(probs >= probs.mean() if inclusive else probs > probs.mean(), as_tuple=True)[0]
    probe = Probe()
    engine.query(probe, obs)
    score = probe.rows[raters].mean(0)
    return raters, torch.sort(torch.topk(score, count).indices).values


def test_progressive_stages_on_the_tiny_model(engine, obs):
    s = MANAGER.create("sparsevlm")
    out = engine.query(s, obs)
    n_raters = s.raters.numel()
    assert 0 < n_raters <= 10  # no more raters than visual tokens left at any stage
    assert s.ranks == {0: n_raters, 1: n_raters, 2: n_raters}  # random attention rows: full rank
    # 32 visual tokens, k = round(32 x 110/576) = 6, geometric over three stages: 18, 10, 6
    assert out.record.visual_per_layer == [32, 18, 10, 6]
    assert [(st.where, st.visual_after) for st in out.record.stages] == [
        ("after_layer_0", 18), ("after_layer_1", 10), ("after_layer_2", 6)]
    dense = engine.query(MANAGER.create("none"), obs).record.tokens_per_layer
    assert out.record.tokens_per_layer == [n - 32 + v for n, v in zip(dense, [32, 18, 10, 6])]
    kept = [out.kept[w].tolist() for w in ("after_layer_0", "after_layer_1", "after_layer_2")]
    assert set(kept[2]) <= set(kept[1]) <= set(kept[0])
    raters, first = independent_first_stage(engine, obs, 18)
    assert s.raters.tolist() == raters.tolist()
    assert kept[0] == first.tolist()


def test_the_keep_ratio_sets_the_final_count_on_the_tiny_model(engine, obs):
    for ratio, final in ((0.5, 16), (0.25, 8), (0.1, 3)):
        out = engine.query(MANAGER.create("sparsevlm", {"keep_ratio": ratio}), obs)
        assert out.record.visual_per_layer[-1] == final
        assert out.record.visual_per_layer == [32, *schedule_counts(32, ratio, 3)]


def test_vla_pruner_variant_is_one_top_k_after_layer_k_minus_1(engine, obs):
    s = MANAGER.create("sparsevlm", {"variant": "vla-pruner", "keep_ratio": 0.25})
    out = engine.query(s, obs)
    assert [(st.where, st.visual_after) for st in out.record.stages] == [("after_layer_0", 8)]
    assert out.record.visual_per_layer == [32, 8, 8, 8]
    raters, first = independent_first_stage(engine, obs, 8, inclusive=True)
    assert s.raters.tolist() == raters.tolist()
    assert out.kept["after_layer_0"].tolist() == first.tolist()


def test_on_the_shipped_policy():
    model, _ = load_model()
    engine = PruningEngine(model, record_kept=True)
    obs = make_observation(5, size=128)
    out = engine.query(MANAGER.create("sparsevlm"), obs)
    # 2 x 64 visual tokens, k = round(128 x 110/576) = 24; after layers 0, 1, 2: 73, 42, 24
    assert out.record.visual_per_layer == [128, 73, 42, 24]
    per_view = MANAGER.create("sparsevlm", {"per_view": True})
    out = engine.query(per_view, obs)
    assert out.record.visual_per_layer == [128, 73, 42, 24]
    # each stage's count split by view size: 73 -> 37 + 36 (largest remainder), 42 -> 21 + 21, 24 -> 12 + 12
    assert [int((out.kept[w] < 64).sum()) for w in ("after_layer_0", "after_layer_1", "after_layer_2")] == [
        37, 21, 12]
