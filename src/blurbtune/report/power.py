"""How large a difference each test of the verdict could detect at its n: the power line.

For each comparison, the smallest difference that the test would find significant at ALPHA
(two-sided) with probability POWER, taking what was observed as the truth. Power is the
probability that the test rejects, in either direction, as usual for a two-sided test. A
"no difference at this n" then says how large a difference it could have missed.

- mean: the paired t-test, from the observed std of the paired differences; exact
  (noncentral t);
- std ratio: Brown-Forsythe, for normal scores; the test depends only on the ratio of the two
  stds and the n's, so the observed spread does not enter; seeded Monte Carlo;
- failure rate: Fisher's exact test, from `none`'s observed failure rate; exact (the two
  binomial outcomes enumerated).

Each function gives NaN below its test's minimum n (report/sample_size.py), and a side with no
difference reaching POWER at this n (the std ratio, the failure rate) is NaN too.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from scipy import optimize, stats

from blurbtune.report import sample_size
from blurbtune.report.constants import ALPHA

POWER = 0.8
# Brown-Forsythe's power is estimated from this many simulated pairs of normal samples,
# drawn with this seed: the same numbers on every run of the report. Its Monte Carlo standard
# error at power 0.8 is sqrt(0.8 * 0.2 / 20000) = 0.003.
STD_DRAWS = 20_000
STD_SEED = 0
# Failure rates scanned for the first one reaching POWER, then refined between grid points.
FAILURE_GRID = 2001
# The CSV columns of the power line, by the test whose note (report/stability.py) blanks them.
COLUMNS = {
    "ttest": ("mean_mde",),
    "brown_forsythe": ("std_ratio_mde_down", "std_ratio_mde_up"),
    "fisher": ("fail_mde_down", "fail_mde_up"),
}


def t_power(noncentrality: float, df: int, alpha: float = ALPHA) -> float:
    """P(|T| > t_{1-alpha/2, df}) for T noncentral t with `df` degrees of freedom.

    The lower tail is P(-T > t) with -T noncentral t of -noncentrality: scipy's nct.cdf far
    in the lower tail can return NaN (df = 1, noncentrality 16), its sf there does not.
    """
    crit = stats.t.isf(alpha / 2, df)
    return float(stats.nct.sf(crit, df, noncentrality) + stats.nct.sf(crit, df, -noncentrality))


def mean_mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest |mean difference| the paired t-test detects with `power`, in sd's units.

    With n pairs whose differences have std `sd` (the observed one, taken as the true sigma),
    t = mean / (sd / sqrt(n)) is noncentral t with n - 1 degrees of freedom and noncentrality
    delta * sqrt(n) / sigma; t_power(nc) = power is solved exactly for nc (brentq) and
    delta = nc * sd / sqrt(n). NaN below sample_size.TTEST_PAIRS pairs, or when sd is 0 or NaN.

    >>> round(mean_mde(1.0, 34), 3)  # G*Power: d = 0.5 needs 34 pairs
    0.49
    """
    if n < sample_size.TTEST_PAIRS or not sd > 0:
        return float("nan")
    return _t_noncentrality(n - 1, alpha, power) * sd / math.sqrt(n)


@cache
def _t_noncentrality(df: int, alpha: float, power: float) -> float:
    """The noncentrality at which the two-sided t-test with `df` degrees of freedom has
    `power`: it depends on the n alone, so a sweep solves it once per n, not per comparison."""
    high = stats.norm.isf(alpha / 2) + stats.norm.ppf(power)  # the normal approximation
    while t_power(high, df, alpha) < power:  # t needs more than the normal: widen
        high *= 2
    return optimize.brentq(lambda nc: t_power(nc, df, alpha) - power, 0.0, high, xtol=1e-12)


def brown_forsythe_statistic(deviation_means: np.ndarray, deviation_ss: np.ndarray,
                             n: tuple[int, int]) -> np.ndarray:
    """Brown-Forsythe's W for two groups from each group's mean and sum of squares of the
    absolute deviations from its median (arrays: one value per simulated pair of samples).

    W = (N - 2) * (n1 n2 / N) * (a1 - a2)^2 / (SS1 + SS2), Levene's one-way ANOVA of the
    deviations with k = 2 groups; it is F(1, N - 2) under the null, as scipy.stats.levene uses.
    """
    total = n[0] + n[1]
    between = n[0] * n[1] / total * (deviation_means[0] - deviation_means[1]) ** 2
    return (total - 2) * between / (deviation_ss[0] + deviation_ss[1])


@cache
def _deviations(n: int, other: int) -> tuple[np.ndarray, np.ndarray]:
    """Per simulated pair of standard normal samples (n, other values): the mean and the sum of
    squares of each group's absolute deviations from its median, shape (2, STD_DRAWS)."""
    rng = np.random.default_rng(STD_SEED)
    means, ss = [], []
    for size in (n, other):
        x = rng.standard_normal((STD_DRAWS, size))
        dev = np.abs(x - np.median(x, axis=1, keepdims=True))
        means.append(dev.mean(axis=1))
        ss.append(((dev - dev.mean(axis=1, keepdims=True)) ** 2).sum(axis=1))
    return np.array(means), np.array(ss)


def brown_forsythe_power(ratio: float, n: int, other: int, alpha: float = ALPHA) -> float:
    """Brown-Forsythe's power when a group of n normal scores has `ratio` times the std of a
    group of `other` (seeded Monte Carlo, STD_DRAWS draws).

    Scaling a group by r scales its deviations from the median by r, so one set of draws
    serves every ratio: the mean deviation becomes r * a, the sum of squares r^2 * SS.
    """
    means, ss = _deviations(n, other)
    scale = np.array([[ratio], [1.0]])
    w = brown_forsythe_statistic(means * scale, ss * scale**2, (n, other))
    return float(np.mean(w > stats.f.isf(alpha, 1, n + other - 2)))


@cache
def _std_ratio_up(n: int, other: int, alpha: float, power: float) -> float:
    """Smallest ratio > 1 of the std of a group of n to that of a group of `other` that
    Brown-Forsythe detects with `power`; NaN when none does (bisection on log ratio)."""
    if min(n, other) < sample_size.BROWN_FORSYTHE_GROUP:
        return float("nan")
    huge = 1e12  # as the ratio grows, W tends to a finite limit: power may never reach `power`
    if brown_forsythe_power(huge, n, other, alpha) < power:
        return float("nan")
    low, high = 1.0, 2.0
    while brown_forsythe_power(high, n, other, alpha) < power:
        low, high = high, high * 2
    while high / low > 1 + 1e-6:
        middle = math.sqrt(low * high)
        if brown_forsythe_power(middle, n, other, alpha) < power:
            low = middle
        else:
            high = middle
    return high


def std_ratio_mde(n: int, n_ref: int, alpha: float = ALPHA, power: float = POWER
                  ) -> tuple[float, float]:
    """(below 1, above 1): the ratios std / std_ref nearest 1 that Brown-Forsythe detects with
    `power` for n and n_ref normal scores; NaN for a side that no ratio reaches.

    The test depends only on the ratio (location and scale cancel), so neither the observed
    stds nor their ratio enter. Below 1 is the ratio above 1 with the groups swapped, so with
    equal n's the two are reciprocals. NaN below sample_size.BROWN_FORSYTHE_GROUP a group.
    """
    return 1.0 / _std_ratio_up(n_ref, n, alpha, power), _std_ratio_up(n, n_ref, alpha, power)


@cache
def _fisher_rejects(n: int, n_ref: int, alpha: float) -> np.ndarray:
    """rejects[k, k_ref]: Fisher's exact test (two-sided, scipy) rejects k/n against k_ref/n_ref."""
    return np.array([[stats.fisher_exact([[k, n - k], [k_ref, n_ref - k_ref]]).pvalue < alpha
                      for k_ref in range(n_ref + 1)] for k in range(n + 1)], float)


def fisher_power(rate: np.ndarray | float, rate_ref: float, n: int, n_ref: int,
                 alpha: float = ALPHA) -> np.ndarray:
    """Fisher's power for failure rates `rate` (n runs) against `rate_ref` (n_ref runs): the
    probability of the outcomes it rejects, every pair of binomial outcomes enumerated."""
    rate = np.atleast_1d(np.asarray(rate, float))
    outcome = stats.binom.pmf(np.arange(n + 1)[None, :], n, rate[:, None])
    outcome_ref = stats.binom.pmf(np.arange(n_ref + 1), n_ref, rate_ref)
    return outcome @ _fisher_rejects(n, n_ref, alpha) @ outcome_ref


@cache
def failure_mde(k_ref: int, n: int, n_ref: int, alpha: float = ALPHA, power: float = POWER
                ) -> tuple[float, float]:
    """(decrease, increase): the failure-rate differences nearest 0 from `none`'s observed rate
    k_ref / n_ref that Fisher's exact test detects with `power` for n runs against n_ref
    (negative, positive); NaN for a side that even a rate of 0 or 1 does not reach.

    Exact: the first rate of a grid (FAILURE_GRID points from the reference rate to 0 or 1)
    whose power reaches `power`, refined between grid points (brentq). NaN below
    sample_size.FISHER_GROUP finished runs a group.
    """
    if min(n, n_ref) < sample_size.FISHER_GROUP:
        return float("nan"), float("nan")
    rate_ref = k_ref / n_ref

    def first(end: float) -> float:
        grid = rate_ref + (end - rate_ref) * np.linspace(0.0, 1.0, FAILURE_GRID)
        reached = np.flatnonzero(fisher_power(grid, rate_ref, n, n_ref, alpha) >= power)
        if end == rate_ref or not len(reached):
            return float("nan")
        i = reached[0]  # > 0: at the reference rate itself the power is at most alpha

        def short(rate: float) -> float:
            return fisher_power(rate, rate_ref, n, n_ref, alpha)[0] - power

        return optimize.brentq(short, grid[i - 1], grid[i], xtol=1e-12) - rate_ref

    return first(0.0), first(1.0)


def detectable(sd_diff: float, n_pairs: int, n_std: int, n_std_ref: int, failures_ref: int,
               finished: int, finished_ref: int) -> dict[str, float]:
    """The power line of one comparison, as the COLUMNS of verdict.csv (fractions, ratios)."""
    down, up = std_ratio_mde(n_std, n_std_ref)
    fail_down, fail_up = failure_mde(failures_ref, finished, finished_ref)
    return {"mean_mde": mean_mde(sd_diff, n_pairs), "std_ratio_mde_down": down,
            "std_ratio_mde_up": up, "fail_mde_down": fail_down, "fail_mde_up": fail_up}
