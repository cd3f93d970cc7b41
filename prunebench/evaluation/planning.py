"""How many episodes a strategy-vs-dense comparison needs (``prunebench plan-episodes``).

The comparison is paired and tested with McNemar's exact test (prunebench.evaluation.paired), so
its power is computed exactly for that test: the number of discordant episodes M is binomial
(n, f), f the share of episodes where the two runs differ; given M = m, the test rejects when the
strategy wins at most c_m of the m discordant episodes, c_m the largest count whose two-sided exact
p-value is <= alpha, and the strategy wins each discordant episode with probability
(f - drop) / (2 f). Power = sum over m of P(M = m) P(reject | m). Only rejections in the direction
of the drop count as detecting it.

Without a measured f, runs are assumed independent given the success rates, which overstates
f for runs that share seeds and init states (they succeed and fail together), hence the number of
episodes: the conservative choice.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import stats

from prunebench.evaluation import metrics


def independent_discordance(baseline: float, drop: float) -> float:
    """Share of episodes where dense and the strategy differ if their outcomes are independent."""
    strategy = baseline - drop
    return baseline * (1 - strategy) + strategy * (1 - baseline)


def discordance_range(baseline: float, drop: float) -> tuple[float, float]:
    """The shares f that the two success rates allow: the strategy-only cell (f - drop) / 2 lies in
    [0, min(baseline - drop, 1 - baseline)]."""
    return drop, drop + 2 * min(baseline - drop, 1 - baseline)


@functools.lru_cache(maxsize=8)
def _critical(size: int, alpha: float) -> np.ndarray:
    """c_m for m < size: the largest c with 2 P(Bin(m, 1/2) <= c) <= alpha (-1: no count rejects)."""
    m = np.arange(size)
    c = stats.binom.ppf(alpha / 2, m, 0.5)
    return np.where(stats.binom.cdf(c, m, 0.5) <= alpha / 2, c, c - 1)


def mcnemar_power(n: int, baseline: float, drop: float, alpha: float = 0.05,
                  discordant: float | None = None) -> float:
    """Exact power of the two-sided McNemar exact test at level ``alpha`` with ``n`` paired episodes,
    when dense succeeds at ``baseline`` and the strategy at ``baseline - drop`` (fractions)."""
    f = independent_discordance(baseline, drop) if discordant is None else discordant
    m = np.arange(n + 1)
    c = _critical(1 << (n + 1).bit_length(), alpha)[: n + 1]  # a power of two: searches reuse it
    strategy_wins = (f - drop) / (2 * f)  # of a discordant episode
    reject = stats.binom.cdf(c, m, strategy_wins)
    return float(np.dot(stats.binom.pmf(m, n, f), reject))


def episodes_for_power(baseline: float, drop: float, alpha: float = 0.05, power: float = 0.8,
                       discordant: float | None = None, limit: int = 1_000_000) -> int:
    """The smallest n with :func:`mcnemar_power` >= ``power``, by doubling then bisection: the power
    grows with n (the number of discordant episodes being random smooths the test's discreteness)."""
    def enough(n: int) -> bool:
        return mcnemar_power(n, baseline, drop, alpha, discordant) >= power

    high = 1
    while not enough(high):
        if high >= limit:
            raise ValueError(f"more than {limit} episodes needed")
        high *= 2
    low = high // 2  # not enough (or 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


def episodes_for_wilson(rate: float, half_width: float = 0.10, z: float = metrics.Z_95) -> int:
    """The fewest episodes whose Wilson interval at success ``rate`` is at most ±``half_width`` wide
    (half its width; the width shrinks as n grows)."""
    n = 1
    while True:
        lo, hi = metrics.wilson_interval(rate * n, n, z)
        if (hi - lo) / 2 <= half_width:
            return n
        n += 1
