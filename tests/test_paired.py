"""Paired comparisons on identical episodes: McNemar's exact test, Newcombe's interval, Holm, pairing
by episode key, the speedup bootstrap, and the closed-loop table that shows them."""

import math
import random

import numpy as np
import pytest
from scipy import optimize

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation import metrics
from prunebench.evaluation.paired import (
    compare_to_baseline,
    episode_key,
    holm,
    mcnemar_exact,
    newcombe_interval,
    paired_difference,
    query_speedup_interval,
    speedup_interval,
)
from prunebench.evaluation.results import ClosedLoopQuery, EpisodeResult, EvalResults, StrategyInfo
from prunebench.evaluation.tables import CLOSED_LOOP_COLUMNS, closed_loop_rows, format_table


def query(ms, dense_ms=None):
    return ClosedLoopQuery(tokens_per_layer=[10], visual_per_layer=[8], llm_flops=1.0, dense_llm_flops=2.0,
                           ms={"total": ms}, dense_ms=None if dense_ms is None else {"total": dense_ms})


def ep(task, init, success, error=None, seed=0, queries=()):
    return EpisodeResult(suite="libero_object", task_id=task, task="t", instruction="i", init_state_id=init,
                         episode_index=0, seed=seed, success=success and not error, steps=5,
                         n_queries=len(queries), wall_s=1.0, error=error, queries=list(queries),
                         failure_reason=None if success or error else "timeout")


def run(outcomes, **kw):
    """Episodes of task 0, init states 0.., with these outcomes."""
    return [ep(0, i, bool(s), **kw) for i, s in enumerate(outcomes)]


# --------------------------------------------------------------------------- the test and the interval
@pytest.mark.parametrize("only_a, only_b", [(0, 0), (6, 16), (3, 0), (0, 7), (5, 5), (2, 9), (12, 1)])
def test_mcnemar_exact_is_the_two_sided_binomial_sum_over_discordant_pairs(only_a, only_b):
    m = only_a + only_b
    tail = sum(math.comb(m, k) for k in range(min(only_a, only_b) + 1)) / 2 ** m
    expected = 1.0 if m == 0 or only_a == only_b else min(1.0, 2 * tail)
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def test_the_published_worked_example():
    """Fagerland, Lydersen & Laake (2013), complete response before and after consolidation therapy
    (Cavo et al. 2012): 59 / 6 / 16 / 80. They report the McNemar exact conditional P = 0.052479 and
    the Newcombe square-and-add interval -0.1186 to -0.0046 for a difference of -0.0621."""
    a = run([1] * 59 + [1] * 6 + [0] * 16 + [0] * 80)
    b = run([1] * 59 + [0] * 6 + [1] * 16 + [0] * 80)
    d = paired_difference(a, b)
    assert (d.n_pairs, d.both, d.only_a, d.only_b, d.neither) == (161, 59, 6, 16, 80)
    assert d.difference == pytest.approx(-0.0621, abs=5e-5) and d.p_value == pytest.approx(0.052479, abs=5e-7)
    assert d.ci95 == pytest.approx((-0.1186, -0.0046), abs=5e-5)


def _wilson_by_root_finding(x, n, z):
    """The score interval's ends straight from its definition: the p with |x/n - p| = z sqrt(p(1-p)/n)."""
    f = lambda p: (x / n - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731
    lo = 0.0 if x == 0 else optimize.brentq(f, 0.0, x / n - 1e-12)  # x/n is a root itself at 0 and 1
    hi = 1.0 if x == n else optimize.brentq(f, x / n + 1e-12, 1.0)
    return lo, hi


@pytest.mark.parametrize("table", [(5, 3, 1, 1), (0, 2, 3, 5), (10, 0, 0, 0), (0, 0, 0, 10), (4, 0, 6, 0),
                                   (1, 1, 7, 12), (30, 1, 4, 15), (2, 5, 0, 0)])
def test_newcombe_interval_from_the_definition(table):
    """Method 10 (Newcombe 1998): L = d - sqrt(dl1^2 - 2 phi dl1 du2 + du2^2), U = d + sqrt(du1^2 -
    2 phi du1 dl2 + dl2^2), Wilson arms of each margin, phi = (AD - BC - n/2)+ / sqrt(margins) when
    AD > BC, (AD - BC) / sqrt(margins) when AD < BC, 0 when a margin is empty."""
    both, only_a, only_b, neither = table
    n, z = sum(table), 1.959963984540054
    x1, x2 = both + only_a, both + only_b
    p1, p2 = x1 / n, x2 / n
    (l1, u1), (l2, u2) = _wilson_by_root_finding(x1, n, z), _wilson_by_root_finding(x2, n, z)
    margins = [x1, n - x1, x2, n - x2]
    ad_bc = both * neither - only_a * only_b
    numerator = max(ad_bc - n / 2, 0) if ad_bc > 0 else ad_bc
    phi = 0.0 if 0 in margins else numerator / math.sqrt(math.prod(margins))
    lower = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    upper = p1 - p2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    assert newcombe_interval(*table) == pytest.approx((lower, upper), abs=1e-9)


def test_ten_identical_outcomes_prove_nothing_two_hundred_do():
    """A paired bootstrap would give [0, 0] here and call any strategy not worse."""
    same = run([1] * 10)
    d = paired_difference(same, same, delta=0.05)
    assert (d.difference, d.p_value, d.not_worse) == (0.0, 1.0, False)
    assert d.ci95[0] < -0.2 and d.ci95[1] > 0.2
    many = run([1] * 200)
    assert paired_difference(many, many, delta=0.05).not_worse is True


def test_holm_on_a_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0] and holm([0.2]) == [0.2] and holm([]) == []


# --------------------------------------------------------------------------- pairing
def test_pairing_is_by_episode_key_whatever_the_order_and_errors_pair_with_nothing():
    a = [ep(0, 0, True), ep(0, 1, True), ep(1, 0, False), ep(1, 1, True), ep(2, 0, True)]  # (2, 0): only in a
    b = [ep(0, 0, True), ep(0, 1, False), ep(1, 0, True), ep(1, 1, True, error="RuntimeError: boom")]
    random.Random(0).shuffle(a)
    d = paired_difference(a, b)
    # pairs: (0,0) both, (0,1) only a, (1,0) only b; (1,1) errored in b, (2,0) missing from b
    assert (d.n_pairs, d.both, d.only_a, d.only_b, d.neither) == (3, 1, 1, 1, 0) and d.difference == 0.0
    other_seed = [ep(0, 0, True, seed=1)]
    assert episode_key(other_seed[0]) == ("libero_object", 0, 0, 1)
    empty = paired_difference(other_seed, b)  # another run seed: other episodes
    assert (empty.n_pairs, empty.difference, empty.ci95, empty.p_value, empty.not_worse) == (0, None, None, None,
                                                                                             None)
    with pytest.raises(PrunebenchError, match="appears twice"):
        paired_difference(a + a[:1], b)


def test_compare_to_baseline_adjusts_p_values_over_the_strategies():
    dense = run([1] * 20)
    runs = {"none": dense, "bad": run([0] * 8 + [1] * 12), "worse": run([0] * 12 + [1] * 8),
            "same": run([1] * 20), "broken": run([1] * 20, error="RuntimeError: x")}
    diffs = compare_to_baseline(runs)
    assert set(diffs) == {"bad", "worse", "same", "broken"} and diffs["broken"].n_pairs == 0
    tested = ["bad", "worse", "same"]
    assert [diffs[n].p_holm for n in tested] == pytest.approx(holm([diffs[n].p_value for n in tested]))
    assert diffs["bad"].p_value == pytest.approx(2 / 2 ** 8) and diffs["broken"].p_holm is None
    with pytest.raises(PrunebenchError, match="'dense'"):
        compare_to_baseline(runs, baseline="dense")


# --------------------------------------------------------------------------- speedup intervals
def correlated_episodes(n=8, queries=20):
    """Each episode has its own latency level (one scene, one stretch of machine state)."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        level = rng.uniform(5, 15)
        out.append(ep(0, i, True, queries=[query(level + rng.normal(0, 0.1), 20 + rng.normal(0, 0.1))
                                           for _ in range(queries)]))
    return out


def test_speedup_interval_resamples_episodes_deterministically():
    episodes = correlated_episodes()
    qs = [q for e in episodes for q in e.queries]
    point = metrics.speedup([q.dense_ms for q in qs], [q.ms for q in qs])
    lo, hi = speedup_interval(episodes, seed=3)
    assert lo < point < hi and speedup_interval(episodes, seed=3) == (lo, hi)
    assert speedup_interval(episodes, seed=4) != (lo, hi)
    # queries of one episode are correlated: resampling them as if independent is far narrower
    qlo, qhi = query_speedup_interval([q.dense_ms for q in qs], [q.ms for q in qs], seed=3)
    assert qlo < point < qhi and (hi - lo) > 2 * (qhi - qlo)


def test_speedup_interval_needs_paired_queries_in_two_episodes():
    assert speedup_interval([ep(0, i, True, queries=[query(5.0)]) for i in range(3)]) is None
    assert speedup_interval([ep(0, 0, True, queries=[query(5.0, 10.0)])]) is None
    assert all(math.isnan(x) for x in query_speedup_interval([{"total": 2.0}], [{"total": 1.0}]))


# --------------------------------------------------------------------------- the table
def results(name, episodes):
    return EvalResults(seed=0, config={}, model={}, protocol={}, init_state_ids={}, attention_backend="sdpa",
                       strategy=StrategyInfo(name=name, config={}, position_ids="original"),
                       environment={}, episodes=episodes).aggregate()


def test_the_closed_loop_table_shows_each_strategy_paired_with_dense():
    timed = lambda outcomes, ms: [ep(0, i, bool(s), queries=[query(ms + i % 3, 20.0 + i % 2)])  # noqa: E731
                                  for i, s in enumerate(outcomes)]
    runs = {"none": results("none", timed([1] * 20, 20.0)),
            "random": results("random", timed([0] * 4 + [1] * 16, 10.0)),
            "fastv": results("fastv", timed([1] * 20, 15.0))}
    rows = {r.strategy: r for r in closed_loop_rows(runs, {n: f"{n}.json" for n in runs})}
    random_row, dense_row = rows["random"], rows["none"]
    d = paired_difference(runs["random"].episodes, runs["none"].episodes)
    assert random_row.success_diff == pytest.approx(-20.0) and random_row.not_worse is False
    lo, hi = d.ci95
    assert random_row.success_diff_ci95 == f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
    assert random_row.p_holm == pytest.approx(holm([d.p_value, 1.0])[0])
    assert random_row.speedup_ci95.startswith("[") and rows["fastv"].success_diff == 0.0
    assert (dense_row.success_diff, dense_row.success_diff_ci95, dense_row.speedup_ci95) == (None, "-", "-")
    table = format_table([r.model_dump() for r in rows.values()], CLOSED_LOOP_COLUMNS).splitlines()
    assert "Δ vs dense" in table[0] and "p (Holm)" in table[0]
    assert " -20.0 " in table[3] and table[2].split()[0] == "none"
    # without a dense run there is nothing to pair with
    alone = closed_loop_rows({"random": runs["random"]}, {"random": "r.json"})
    assert alone[0].success_diff is None and alone[0].speedup_ci95.startswith("[")
