"""``prunebench plan-episodes``: the exact power of McNemar's exact test, the episodes it needs."""

import pytest
from scipy import stats

from prunebench.cli.main import main
from prunebench.evaluation import metrics
from prunebench.evaluation.planning import (
    episodes_for_power,
    episodes_for_wilson,
    independent_discordance,
    mcnemar_power,
)


def power_by_enumeration(n, baseline, drop, alpha, discordant):
    """Every paired table of n episodes (dense-only d, strategy-only s), its trinomial probability,
    and whether scipy's exact binomial test rejects in the direction of the drop."""
    dense_only, strategy_only = (discordant + drop) / 2, (discordant - drop) / 2
    total = 0.0
    for d in range(n + 1):
        for s in range(n + 1 - d):
            if s < d and stats.binomtest(s, s + d, 0.5).pvalue <= alpha:
                total += stats.multinomial.pmf([d, s, n - d - s], n, [dense_only, strategy_only, 1 - discordant])
    return total


@pytest.mark.parametrize("n, baseline, drop, discordant", [(12, 0.8, 0.3, None), (25, 0.7, 0.2, 0.3),
                                                            (40, 0.9, 0.1, 0.15)])
def test_power_is_the_sum_over_every_table_the_test_rejects(n, baseline, drop, discordant):
    f = independent_discordance(baseline, drop) if discordant is None else discordant
    assert mcnemar_power(n, baseline, drop, 0.05, discordant) == pytest.approx(
        power_by_enumeration(n, baseline, drop, 0.05, f), rel=1e-9)


def test_power_grows_with_episodes_and_the_plan_is_the_fewest_that_reach_it():
    powers = [mcnemar_power(n, 0.8, 0.15) for n in range(0, 300, 10)]
    assert powers[0] == 0.0 and all(a < b for a, b in zip(powers[1:], powers[2:])) and powers[-1] > 0.8
    for baseline, drop, discordant in [(0.8, 0.1, None), (0.8, 0.1, 0.12), (0.5, 0.2, 0.25), (0.95, 0.5, None)]:
        n = episodes_for_power(baseline, drop, 0.05, 0.8, discordant)
        assert mcnemar_power(n, baseline, drop, 0.05, discordant) >= 0.8
        assert mcnemar_power(n - 1, baseline, drop, 0.05, discordant) < 0.8
    # fewer discordant episodes (runs that succeed and fail together) need fewer episodes
    assert episodes_for_power(0.8, 0.1, discordant=0.12) < episodes_for_power(0.8, 0.1)


def test_wilson_plan_is_the_fewest_episodes_with_a_narrow_enough_interval():
    n = episodes_for_wilson(0.8, 0.10)
    half = lambda k: (lambda lo, hi: (hi - lo) / 2)(*metrics.wilson_interval(0.8 * k, k))  # noqa: E731
    assert half(n) <= 0.10 < half(n - 1)


def test_plan_episodes_prints_the_counts(capsys):
    assert main(["plan-episodes", "--baseline", "0.8", "--drop", "0.1"]) == 0
    out = capsys.readouterr().out
    assert f"{episodes_for_power(0.8, 0.1)} episodes per strategy" in out
    assert f"{episodes_for_wilson(0.8)} episodes" in out.splitlines()[-1]


@pytest.mark.parametrize("argv, flag", [
    (["--baseline", "1.0", "--drop", "0.1"], "--baseline"), (["--baseline", "0", "--drop", "0.1"], "--baseline"),
    (["--baseline", "0.3", "--drop", "0.3"], "--drop"), (["--baseline", "0.3", "--drop", "-0.1"], "--drop"),
    (["--baseline", "0.8", "--drop", "0.1", "--alpha", "1"], "--alpha"),
    (["--baseline", "0.8", "--drop", "0.1", "--power", "0"], "--power"),
    (["--baseline", "0.8", "--drop", "0.1", "--discordant", "0.05"], "--discordant"),
    (["--baseline", "0.8", "--drop", "0.1", "--discordant", "0.6"], "--discordant"),
])
def test_bad_plan_values_are_one_line_naming_the_flag(capsys, argv, flag):
    assert main(["plan-episodes", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag}:")
