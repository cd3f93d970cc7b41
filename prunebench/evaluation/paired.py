"""Paired comparisons of closed-loop runs that played the same episodes.

Every strategy plays the same (suite, task, init state, seed) episodes as dense: an episode's seeds
depend on nothing else (:attr:`prunebench.evaluation.episode.Job.seed_key`). So a strategy and its
baseline are compared episode by episode, as a paired 2x2 table (both succeeded, only one did,
neither), not as two independent samples: what both runs share (easy and hard init states) drops
out, and only the discordant episodes carry evidence. Errored episodes are no outcome and leave
their pair out. The choices, and why:

* **Test**: McNemar's exact test, i.e. the conditional binomial test of the discordant pairs
  against 1/2 (McNemar 1947; Fagerland, Lydersen & Laake 2013, BMC Med Res Methodol 13:91). Exact,
  because a comparison has tens of episodes and a handful of discordant ones, where the asymptotic
  chi-squared test is unreliable.
* **Interval** of the difference of success rates: Newcombe's hybrid score interval for paired
  proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10), built from the two
  Wilson intervals and the phi correlation of the table; recommended by Fagerland et al. (2013).
  Not a paired bootstrap: with no discordant pair every resample is a difference of 0, so the
  interval collapses to [0, 0] and 10 identical outcomes would "prove" non-inferiority. Not Wald:
  it undercovers at small n and is [0, 0] in the same case.
* **Not worse within delta**: the interval's lower bound is above -delta (a non-inferiority test at
  one-sided level (1 - confidence) / 2).
* **Holm** (1979) step-down adjustment when several strategies are compared with one baseline:
  controls the family-wise error rate under any dependence between the comparisons.
* **Speedup interval**: a percentile bootstrap (Efron & Tibshirani 1993) of
  :func:`prunebench.evaluation.metrics.speedup` that resamples whole episodes, because the queries
  of one episode share a scene and a stretch of machine state; resampling queries would pretend
  they are independent and give too narrow an interval. On a stream (no episodes) queries are
  resampled in pairs (strategy and dense on the same observation).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from pydantic import BaseModel
from scipy import stats

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation import metrics
from prunebench.evaluation.results import EpisodeResult

DELTA = 0.05  # the default non-inferiority margin: 5 points of success rate


def episode_key(e: EpisodeResult) -> tuple[str, int, int, int]:
    """What makes two episodes the same episode: (suite, task_id, init_state_id, run seed)."""
    return e.suite, e.task_id, e.init_state_id, e.seed


class PairedDifference(BaseModel):
    """Run a vs run b on the episodes both played (a: a strategy, b: its baseline)."""

    n_pairs: int  # episodes present in both runs, both with an outcome (errored episodes excluded)
    both: int  # successes in both
    only_a: int  # a succeeded, b failed
    only_b: int  # b succeeded, a failed
    neither: int
    difference: float | None  # success rate of a minus that of b over the pairs; None when n_pairs == 0
    ci95: tuple[float, float] | None  # Newcombe's hybrid score interval (at ``confidence``)
    p_value: float | None  # two-sided McNemar exact test
    p_holm: float | None = None  # Holm-adjusted, when several strategies are compared with one baseline
    delta: float  # the non-inferiority margin used (fraction, 0.05 = 5 points)
    not_worse: bool | None  # True only when ci95's lower bound > -delta; None when n_pairs == 0


def _outcomes(episodes: list[EpisodeResult]) -> dict[tuple, bool]:
    out: dict[tuple, bool] = {}
    for e in episodes:
        if e.error:
            continue  # an error is no outcome: never a failure
        key = episode_key(e)
        if key in out:
            raise PrunebenchError(f"episode {key} appears twice in one run: cannot pair it")
        out[key] = e.success
    return out


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of the discordant counts under 'a and b succeed alike'; 1 without any."""
    m = only_a + only_b
    return float(stats.binomtest(only_a, m, 0.5).pvalue) if m else 1.0


def newcombe_interval(both: int, only_a: int, only_b: int, neither: int,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998) method 10 for p_a - p_b on a paired 2x2 table (n > 0): the square-and-add
    of the two Wilson intervals' arms, less twice their covariance (phi times their product)."""
    n = both + only_a + only_b + neither
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    wins_a, wins_b = both + only_a, both + only_b
    p1, p2 = wins_a / n, wins_b / n
    l1, u1 = metrics.wilson_interval(wins_a, n, z)
    l2, u2 = metrics.wilson_interval(wins_b, n, z)
    # phi of the table, its positive part shrunk by n/2 as in Newcombe's method 10; 0 when undefined
    margins = wins_a * (n - wins_a) * wins_b * (n - wins_b)
    cross = both * neither - only_a * only_b
    cross = max(0.0, cross - n / 2) if cross >= 0 else cross
    phi = cross / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, p1 - p2 - below), min(1.0, p1 - p2 + above)


def paired_difference(a: list[EpisodeResult], b: list[EpisodeResult], delta: float = DELTA,
                      confidence: float = 0.95) -> PairedDifference:
    """Success of run ``a`` vs run ``b`` on the episodes both played (paired by :func:`episode_key`)."""
    ra, rb = _outcomes(a), _outcomes(b)
    keys = ra.keys() & rb.keys()
    cells = Counter((ra[k], rb[k]) for k in keys)
    table = dict(both=cells[True, True], only_a=cells[True, False], only_b=cells[False, True],
                 neither=cells[False, False])
    n = len(keys)
    if n == 0:
        return PairedDifference(n_pairs=0, **table, difference=None, ci95=None, p_value=None, delta=delta,
                                not_worse=None)
    ci = newcombe_interval(**table, confidence=confidence)
    return PairedDifference(n_pairs=n, **table, difference=(table["only_a"] - table["only_b"]) / n, ci95=ci,
                            p_value=mcnemar_exact(table["only_a"], table["only_b"]), delta=delta,
                            not_worse=ci[0] > -delta)


def holm(p_values: list[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input order: the i-th smallest p times
    (m - i + 1), made monotone by a running maximum, clipped to 1."""
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(range(len(p_values)), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare_to_baseline(runs: dict[str, list[EpisodeResult]], baseline: str = "none",
                        delta: float = DELTA) -> dict[str, PairedDifference]:
    """Every run except ``baseline`` against it, with Holm-adjusted p-values over those comparisons."""
    if baseline not in runs:
        raise PrunebenchError(f"no {baseline!r} run to compare with (runs: {', '.join(sorted(runs))})")
    out = {name: paired_difference(episodes, runs[baseline], delta)
           for name, episodes in runs.items() if name != baseline}
    tested = [name for name, d in out.items() if d.p_value is not None]
    for name, p in zip(tested, holm([out[name].p_value for name in tested])):
        out[name].p_holm = p
    return out


def _ratio(dense: np.ndarray, ms: np.ndarray, axis: int = -1):
    """metrics.speedup on arrays of total ms: median dense / median strategy."""
    return np.median(dense, axis=axis) / np.maximum(1e-9, np.median(ms, axis=axis))


def _percentile_bootstrap(data: tuple, statistic, confidence: float, n_resamples: int, seed: int,
                          **kw) -> tuple[float, float]:
    result = stats.bootstrap(data, statistic, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", random_state=np.random.default_rng(seed), **kw)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def speedup_interval(episodes: list[EpisodeResult], confidence: float = 0.95, n_resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap interval of the speedup vs dense over the queries that have ``dense_ms``, resampling
    whole episodes. None when fewer than two episodes have such queries (one episode shows nothing
    of the spread between episodes). Deterministic for a seed."""
    totals = lambda qs, attr: np.array([getattr(q, attr).get("total", 0.0) for q in qs])  # noqa: E731
    per_episode = [(totals(paired, "dense_ms"), totals(paired, "ms"))
                   for paired in ([q for q in e.queries if q.dense_ms] for e in episodes) if paired]
    if len(per_episode) < 2:
        return None

    def statistic(picked: np.ndarray) -> float:
        return float(_ratio(np.concatenate([per_episode[i][0] for i in picked]),
                            np.concatenate([per_episode[i][1] for i in picked])))

    return _percentile_bootstrap((np.arange(len(per_episode)),), statistic, confidence, n_resamples, seed,
                                 vectorized=False)


def query_speedup_interval(dense_ms: list[dict], ms: list[dict], confidence: float = 0.95,
                           n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The same interval on a stream comparison (no episodes): paired queries resampled (query i of
    ``dense_ms`` ran on the observation of query i of ``ms``). (nan, nan) below two queries."""
    if len(dense_ms) != len(ms):
        raise ValueError(f"{len(dense_ms)} dense queries paired with {len(ms)} queries")
    if len(ms) < 2:
        return float("nan"), float("nan")
    dense = np.array([m.get("total", 0.0) for m in dense_ms])
    return _percentile_bootstrap((dense, np.array([m.get("total", 0.0) for m in ms])), _ratio, confidence,
                                 n_resamples, seed, paired=True, vectorized=True)
