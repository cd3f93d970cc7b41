"""SparseVLM on hand-computed inputs (raters, scores, rank, counts, recycling) and end to end through the
engine."""

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
    Stage,
    Strategy,
    TokenLayout,
    attention,
    row_embeddings,
    visual_keys,
)
from prunebench.engine.loop import PruningEngine
from prunebench.engine.signals import visual_embeddings
from prunebench.models import load_model
from prunebench.plugins.manager import MANAGER
from prunebench.strategies.sparsevlm import (
    SparseVLM,
    SparseVLMConfig,
    dpc_knn_clusters,
    knn_density,
    rank_adapted_count,
    rater_rank,
    rater_scores,
    raters_from_relevance,
    recycle,
    recycle_counts,
    recycle_split,
    schedule_counts,
    text_relevance,
)
from tests.conftest import make_observation
from tests.helpers import FixedPlan

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
    s = MANAGER.create("sparsevlm", {"keep_ratio": 0.25, "layers": (0, 1), "recycle": False})  # k = 2; 4, 2
    plan = s.schedule(ctx)
    assert [st.after_layer for st in plan.stages] == [0, 1] and s.targets == [4, 2]
    assert [st.verb for st in plan.stages] == ["drop", "drop"]
    first = [0.1, 0.2, 0.0, 0.0, 0.6, 0.3, 0.0, 0.0]
    rows = torch.tensor([first, second_rater, [1.0] * 8, [1.0] * 8])  # rows 2, 3 are no raters
    ctx.signals[attention(0, "prompt", per_row=True)] = rows
    scores = s.score(plan.stages[0], ctx.signals, ctx)
    assert s.raters.tolist() == [0, 1]
    assert torch.allclose(scores, (rows[0] + rows[1]) / 2)
    assert s.ranks[0] == (2 if len(kept) == 4 else 1)
    assert s.select(plan.stages[0], scores, ctx, layout).tolist() == kept
    # without the rank: the schedule's 4
    s = MANAGER.create("sparsevlm", {"keep_ratio": 0.25, "layers": (0, 1), "rank_adaptive": False,
                                     "recycle": False})
    plan = s.schedule(ctx)
    scores = s.score(plan.stages[0], ctx.signals, ctx)
    assert s.select(plan.stages[0], scores, ctx, layout).numel() == 4 and s.ranks == {}


# ----------------------------------------------------------------------------- recycling
@pytest.mark.parametrize("deleted, recycled, clusters", [
    (0, 0, 0),
    (1, 1, 1),      # int(0.3) + 1 = 1, int(1/10) + 1 = 1
    (9, 3, 1),      # int(2.7) + 1
    (14, 5, 1),     # int(4.2) + 1
    (29, 9, 1),     # int(8.7) + 1 = 9 < 10: still one cluster
    (30, 10, 2),    # int(9.0) + 1 = 10: a second cluster
    (173, 52, 6),   # int(51.9) + 1 = 52, int(5.2) + 1 = 6
    (330, 100, 11),
])
def test_the_release_recycles_30_percent_plus_one_in_one_cluster_per_10_plus_one(deleted, recycled, clusters):
    assert recycle_counts(deleted) == (recycled, clusters)


@pytest.mark.parametrize("present, total, split", [
    # 18 of 32: 14 deleted -> 1 cluster; keeping 17 by score deletes 15 -> int(4.5) + 1 = 5 recycled, 1 cluster
    (32, 18, (17, 5, 1)),
    # 21 of 50: 29 deleted would make 1 cluster, but keeping 20 deletes 30 -> 10 recycled, 2 clusters; keeping
    # 19 deletes 31 -> int(9.3) + 1 = 10, still 2: 19 + 2 = 21
    (50, 21, (19, 10, 2)),
    (128, 73, (71, 18, 2)),  # 57 deleted: int(17.1) + 1 = 18
    (512, 339, (333, 54, 6)),  # 179 deleted: int(53.7) + 1 = 54, int(5.4) + 1 = 6
    (11, 2, (1, 4, 1)),  # 10 deleted: int(3.0) + 1 = 4
    (40, 1, (1, 0, 0)),  # 39 deleted would need 2 clusters in a budget of 1: no recycling
    (10, 10, (10, 0, 0)),  # nothing deleted
    (10, 12, (10, 0, 0)),
])
def test_the_cluster_tokens_count_inside_the_stages_total(present, total, split):
    assert recycle_split(present, total) == split
    scored, _, clusters = split
    assert scored + clusters == min(total, present)


# three groups of three 2-D points around (0, 0), (10, 0) (half the spread: the densest) and (0, 10) (3/4)
GROUPS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0],
                       [10.0, 0.0], [10.5, 0.0], [10.0, 1.0],
                       [0.0, 10.0], [0.75, 10.0], [0.0, 11.5]])


def test_knn_density_by_hand():
    dist = torch.cdist(GROUPS, GROUPS) / math.sqrt(2)  # the release divides by sqrt(feature size)
    log_density = knn_density(dist, 3).log()
    # (0, 0): nearest 3 at 0, 1, 2 -> squared / 2: 0, 1/2, 2 -> mean 5/6; (1, 0): 0, 1, sqrt 5 -> 1;
    # (0, 2): 0, 2, sqrt 5 -> 3/2; the second group at half the spread: a quarter of those
    assert torch.allclose(log_density[:6], -torch.tensor([5 / 6, 1.0, 1.5, 5 / 24, 1 / 4, 3 / 8]), atol=1e-6)


def test_density_peak_clusters_of_obvious_groups():
    labels, centres = dpc_knn_clusters(GROUPS, 3)
    # centres by density x separation: (10, 0) is the densest (separation: the largest distance,
    # 15.6 / sqrt 2), then (0, 10) (13.5 / sqrt 2 to the densest group), then (0, 0) (10 / sqrt 2)
    assert centres.tolist() == [3, 6, 0]
    assert labels.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    # two clusters: k = 2, so a density comes from the nearest neighbour alone and (10, 0), (10.5, 0)
    # tie, as do (0, 10), (0.75, 10): the earlier row counts as the denser; the centres are (10, 0)
    # and (0, 10) (10 / sqrt 2 from the densest group, (0, 0)'s score is lower: density e^-1/4 < e^-9/64)
    labels, centres = dpc_knn_clusters(GROUPS, 2)
    assert centres.tolist() == [3, 6]
    # the third group splits by nearest centre: (1, 0) is 9 from (10, 0) and 10.05 from (0, 10); (0, 2)
    # 10.2 and 8; (0, 0) 10 from both: the earlier centre takes it
    assert labels.tolist() == [0, 0, 1, 0, 0, 0, 1, 1, 1]
    # ties go to the earlier row (the better score): identical points, the first is the centre
    labels, centres = dpc_knn_clusters(torch.ones(4, 3), 2)
    assert centres.tolist() == [0, 1] and labels.tolist() == [0, 1, 0, 0]


def hand_recycling():
    """10 tokens; the pool after the 2 best: 3, 4, 5, 6, 7 (by score), two groups in feature space."""
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.05])
    features = torch.full((10, 2), 100.0)  # tokens outside the pool must not matter
    features[3], features[5], features[7] = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features[4], features[6] = torch.tensor([10.0, 10.0]), torch.tensor([10.0, 11.0])
    return scores, features


def test_recycling_keeps_one_representative_per_cluster_and_folds_the_rest_into_it():
    scores, features = hand_recycling()
    keep, removed, into = recycle(scores, torch.arange(10), (2, 5, 2), features, torch.ones(10))
    # kept by score: 0, 2; the pool 3, 4, 5, 6, 7 clusters as {3, 5, 7} and {4, 6}; representatives:
    # the best-scored member of each (3, 4); 8, 1, 9 (the worst) are dropped
    assert keep.tolist() == [0, 2, 3, 4]
    assert sorted(zip(removed.tolist(), into.tolist())) == [(5, 3), (6, 4), (7, 3)]
    # a member already holding two tokens (an earlier cluster) gives way to one holding one, so the
    # plain mean of the members is still exact
    sizes = torch.ones(10)
    sizes[3] = 2
    keep, removed, into = recycle(scores, torch.arange(10), (2, 5, 2), features, sizes)
    assert keep.tolist() == [0, 2, 4, 5]
    assert sorted(zip(removed.tolist(), into.tolist())) == [(3, 5), (6, 4), (7, 5)]
    # no clusters: the top of the scores, nothing folded
    keep, removed, into = recycle(scores, torch.arange(10), (4, 0, 0), features, torch.ones(10))
    assert keep.tolist() == [0, 2, 3, 4] and removed.numel() == into.numel() == 0


def test_a_recycling_stage_keeps_the_cluster_tokens_inside_its_count():
    ctx, layout = hand_context()
    s = MANAGER.create("sparsevlm", {"keep_ratio": 0.25, "layers": (0, 1)})  # recycles by default
    plan = s.schedule(ctx)
    assert [st.verb for st in plan.stages] == ["merge", "merge"]
    assert visual_keys(0) in plan.signals and visual_keys(1) in plan.signals
    rows = torch.tensor([[0.1, 0.2, 0.0, 0.0, 0.6, 0.3, 0.0, 0.0], [0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0],
                         [1.0] * 8, [1.0] * 8])
    ctx.signals[attention(0, "prompt", per_row=True)] = rows
    ctx.signals[visual_keys(0)] = torch.arange(16.0).reshape(8, 2)
    scores = s.score(plan.stages[0], ctx.signals, ctx)  # (0.05, 0.55, 0, 0, 0.3, 0.15, 0.4, 0)
    # 4 of 8 (full rank): 3 by score (1, 6, 4), then the 2 best deleted (5, 0) recycled in 1 cluster whose
    # representative is 5; the other deleted (2, 3, 7) are dropped
    keep = s.select(plan.stages[0], scores, ctx, layout)
    assert keep.tolist() == [1, 4, 5, 6] and s.recycling[0] == [(3, 2, 1)]
    assignment = s.assign(plan.stages[0], keep, ctx, layout)
    assert assignment.removed.tolist() == [0] and assignment.into.tolist() == [5]
    assert assignment.weight.tolist() == [1.0]
    assert s.sizes.tolist() == [1, 1, 1, 1, 1, 2, 1, 1]  # 5 now holds 0


# ----------------------------------------------------------------------------- configuration
def test_defaults_layers_and_registration():
    c = SparseVLMConfig()
    assert (c.variant, c.keep_ratio, c.layers, c.per_view, c.rater_rows, c.recycle) == (
        "original", 110 / 576, None, False, "prompt", True)  # v1 always recycles
    assert SparseVLMConfig(variant="vla-pruner").recycle is False  # VLA-Pruner's never does
    with pytest.raises(ValidationError, match="never recycles"):
        SparseVLMConfig(variant="vla-pruner", recycle=True)
    s = MANAGER.create("sparsevlm")
    assert s.layers(32) == (2, 6, 15, 19) and s.layers(8) == (1, 2, 4, 5) and s.layers(4) == (0, 1, 2)
    assert MANAGER.create("sparsevlm", {"layers": (1, 9, 2)}).layers(4) == (1, 2)  # sorted, inside
    v = MANAGER.create("sparsevlm", {"variant": "vla-pruner"})
    assert v.layers(32) == (2,) and v.layers(4) == (0,)
    assert s.position_ids == v.position_ids == "original"
    assert MANAGER.create("sparsevlm", {"release_positions": True}).position_ids == "recompact"
    with pytest.raises(ValidationError, match="keeps the original positions"):
        SparseVLMConfig(variant="vla-pruner", release_positions=True)
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
    assert "strategy sparsevlm: positions=original" in capsys.readouterr().out


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


@pytest.mark.parametrize("recycle", [True, False])
def test_progressive_stages_on_the_tiny_model(engine, obs, recycle):
    s = MANAGER.create("sparsevlm", {"recycle": recycle})
    out = engine.query(s, obs)
    assert [st.verb for st in out.record.stages] == ["merge" if recycle else "drop"] * 3
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
    # recycling: 17 by score, the next 5 in one cluster represented by the best of them (the 18th)
    assert kept[0] == first.tolist()


def test_recycling_on_the_tiny_model_counts_inside_the_budget_and_changes_the_hidden_states(engine, obs):
    recycled = MANAGER.create("sparsevlm")
    on = engine.query(recycled, obs)
    off = engine.query(MANAGER.create("sparsevlm", {"recycle": False}), obs)
    # (kept by score, recycled, clusters): 18 of 32 -> 17 + 1 (15 deleted: 5 recycled); 10 of 18 -> 9 + 1
    # (9 deleted: 3); 6 of 10 -> 5 + 1 (5 deleted: 2)
    assert recycled.recycling == {0: [(17, 5, 1)], 1: [(9, 3, 1)], 2: [(5, 2, 1)]}
    assert on.record.tokens_per_layer == off.record.tokens_per_layer
    assert on.record.llm_flops == off.record.llm_flops
    assert on.kept["after_layer_0"].tolist() == off.kept["after_layer_0"].tolist()  # the same tokens ...
    assert not torch.allclose(torch.as_tensor(on.actions), torch.as_tensor(off.actions))  # ... merged


def test_recycle_off_is_a_plain_drop_run(engine, obs):
    s = MANAGER.create("sparsevlm", {"recycle": False})
    out = engine.query(s, obs)
    assert visual_keys(0) not in s.schedule(engine.context(obs)).signals  # no keys for nothing to cluster
    kept = dict(out.kept)
    drops = FixedPlan([Stage(layer) for layer in (0, 1, 2)], keep_fn=lambda stage, layout: kept[stage.where],
                      position_ids="original")
    reference = engine.query(drops, obs)
    assert [st.verb for st in reference.record.stages] == ["drop"] * 3
    assert {w: k.tolist() for w, k in reference.kept.items()} == {w: k.tolist() for w, k in kept.items()}
    assert torch.equal(torch.as_tensor(out.actions), torch.as_tensor(reference.actions))


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
    s = MANAGER.create("sparsevlm")
    out = engine.query(s, obs)
    # 2 x 64 visual tokens, k = round(128 x 110/576) = 24; after layers 0, 1, 2: 73, 42, 24, the
    # recycled cluster tokens included: 71 + 2 (57 deleted, 18 recycled), 40 + 2 (33, 10), 23 + 1 (19, 6)
    assert out.record.visual_per_layer == [128, 73, 42, 24]
    assert [st.verb for st in out.record.stages] == ["merge"] * 3
    assert s.recycling == {0: [(71, 18, 2)], 1: [(40, 10, 2)], 2: [(23, 6, 1)]}
    off = engine.query(MANAGER.create("sparsevlm", {"recycle": False}), obs)
    assert off.record.visual_per_layer == [128, 73, 42, 24]
    assert [st.verb for st in off.record.stages] == ["drop"] * 3
    assert not np.allclose(out.actions, off.actions)
    per_view = MANAGER.create("sparsevlm", {"per_view": True})
    out = engine.query(per_view, obs)
    assert out.record.visual_per_layer == [128, 73, 42, 24]
    # each stage's count split by view size: 73 -> 37 + 36 (largest remainder), 42 -> 21 + 21, 24 -> 12 + 12
    assert [int((out.kept[w] < 64).sum()) for w in ("after_layer_0", "after_layer_1", "after_layer_2")] == [
        37, 21, 12]
    # each view recycles inside its own quota: 37 of 64 -> 36 + 1 (28 deleted, 9 recycled), 36 -> 35 + 1
    assert per_view.recycling[0] == [(36, 9, 1), (35, 9, 1)]
