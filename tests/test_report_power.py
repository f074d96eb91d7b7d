"""The power line: the smallest difference each verdict test could detect at its n, checked
against a published example, computations written out here (a noncentral-t integral, Fisher's
test and its power enumerated by hand), scipy's own tests by simulation, and the F test."""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_runs import write_run
from scipy import integrate, optimize
from scipy import stats as sps

from blurbtune.report import make_report
from blurbtune.report import power as pw

ALPHA, POWER = 0.05, 0.8


# --- mean: the paired t-test -------------------------------------------------------------

def t_power_by_integral(delta: float, sd: float, n: int) -> float:
    """Power of the two-sided one-sample t-test, written out: t = (Z + nc) / sqrt(V / df) with
    V chi-square(df), so P(|t| > c) = E_V[Phi(nc - c s) + Phi(-nc - c s)], s = sqrt(V / df)."""
    df, nc = n - 1, delta * math.sqrt(n) / sd
    c = sps.t.isf(ALPHA / 2, df)

    def integrand(v: float) -> float:
        s = math.sqrt(v / df)
        return sps.chi2.pdf(v, df) * (sps.norm.cdf(nc - c * s) + sps.norm.cdf(-nc - c * s))

    return integrate.quad(integrand, 0, np.inf, epsabs=1e-12, limit=200)[0]


def test_mean_mde_against_a_published_power() -> None:
    """G*Power, one-sample t, two tails, d = 1/3, alpha 0.05, n = 25: power 0.360 (Wuensch,
    'G*Power: t Tests')."""
    assert pw.t_power(math.sqrt(25) / 3, 24) == pytest.approx(0.360, abs=5e-4)
    assert pw.mean_mde(1.0, 25, power=0.360) == pytest.approx(1 / 3, abs=1e-3)


@pytest.mark.parametrize(("sd", "n"), [(0.1, 2), (0.05, 3), (0.2, 5), (1.0, 10), (0.03, 40)])
def test_mean_mde_has_power_by_the_integral(sd: float, n: int) -> None:
    mde = pw.mean_mde(sd, n)
    assert t_power_by_integral(mde, sd, n) == pytest.approx(POWER, abs=1e-6)
    assert t_power_by_integral(0.98 * mde, sd, n) < POWER  # and nothing smaller has it
    z = sps.norm.isf(ALPHA / 2) + sps.norm.ppf(POWER)  # the normal approximation: t needs more
    assert mde > z * sd / math.sqrt(n)
    assert pw.mean_mde(2 * sd, n) == pytest.approx(2 * mde, rel=1e-9)


def test_mean_mde_tends_to_the_normal_approximation() -> None:
    z = sps.norm.isf(ALPHA / 2) + sps.norm.ppf(POWER)
    assert pw.mean_mde(1.0, 5) > 1.2 * z / math.sqrt(5)
    assert pw.mean_mde(1.0, 2000) == pytest.approx(z / math.sqrt(2000), rel=2e-3)


def test_mean_mde_by_simulating_scipys_t_test() -> None:
    sd, n = 0.15, 5
    mde = pw.mean_mde(sd, n)
    diffs = np.random.default_rng(7).normal(mde, sd, size=(20_000, n))
    rejected = np.mean(sps.ttest_1samp(diffs, 0.0, axis=1).pvalue < ALPHA)
    assert rejected == pytest.approx(POWER, abs=0.015)  # 5 Monte Carlo standard errors


def test_mean_mde_needs_two_pairs_and_a_spread() -> None:
    assert np.isnan(pw.mean_mde(0.1, 1))
    assert np.isnan(pw.mean_mde(0.0, 5))
    assert np.isnan(pw.mean_mde(float("nan"), 5))
    assert np.isfinite(pw.mean_mde(0.1, 2))


# --- std ratio: Brown-Forsythe -----------------------------------------------------------

def test_brown_forsythe_statistic_is_scipys() -> None:
    rng = np.random.default_rng(3)
    for n, other in ((5, 5), (6, 9), (10, 4)):
        x, y = rng.normal(0, 2, n), rng.normal(1, 1, other)
        dev = [np.abs(g - np.median(g)) for g in (x, y)]
        w = pw.brown_forsythe_statistic(np.array([d.mean() for d in dev]),
                                        np.array([((d - d.mean()) ** 2).sum() for d in dev]),
                                        (n, other))
        assert w == pytest.approx(sps.levene(x, y, center="median").statistic, rel=1e-12)


def f_test_ratio_up(n: int, n_ref: int) -> float:
    """Smallest std ratio > 1 the two-sided F test of variances detects with POWER: exact, as
    s^2 / s_ref^2 is ratio^2 times F(n - 1, n_ref - 1) for normal scores."""
    df = (n - 1, n_ref - 1)
    low, high = sps.f.ppf(ALPHA / 2, *df), sps.f.isf(ALPHA / 2, *df)

    def power(ratio: float) -> float:
        return sps.f.sf(high / ratio**2, *df) + sps.f.cdf(low / ratio**2, *df)

    return optimize.brentq(lambda r: power(r) - POWER, 1.0, 100.0)


@pytest.mark.parametrize(("n", "n_ref"), [(10, 10), (8, 12), (20, 20)])
def test_std_ratio_mde_is_above_the_f_test_bound(n: int, n_ref: int) -> None:
    """Under normality the F test is the most powerful here, so Brown-Forsythe needs more."""
    down, up = pw.std_ratio_mde(n, n_ref)
    assert up > f_test_ratio_up(n, n_ref)
    assert down < 1 / f_test_ratio_up(n_ref, n)
    assert up < 2 * f_test_ratio_up(n, n_ref)  # robust, not useless: within twice the F test's


def levene_power(ratio: float, n: int, n_ref: int, draws: int = 2000, seed: int = 11) -> float:
    """Brown-Forsythe's power by simulating scipy.stats.levene itself (not the module's draws)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([sps.levene(ratio * rng.standard_normal(n), rng.standard_normal(n_ref),
                                     center="median").pvalue < ALPHA for _ in range(draws)]))


@pytest.mark.parametrize(("n", "n_ref"), [(8, 8), (10, 6)])
def test_std_ratio_mde_has_power_by_scipys_levene(n: int, n_ref: int) -> None:
    down, up = pw.std_ratio_mde(n, n_ref)
    for ratio in (down, up):  # 2000 draws: standard error 0.009
        assert levene_power(ratio, n, n_ref) == pytest.approx(POWER, abs=0.03)
    assert levene_power(1.0, n, n_ref) < 0.1  # the simulation can tell: no effect, no power


def test_std_ratio_mde_none_possible_at_five_a_group() -> None:
    """With 5 normal scores a group, Brown-Forsythe rejects about half the time however large
    the ratio: no ratio is detectable with power 0.8. At 6 a group one is."""
    assert all(np.isnan(pw.std_ratio_mde(5, 5)))
    assert levene_power(1e6, 5, 5, draws=1000) < 0.6
    assert all(np.isfinite(pw.std_ratio_mde(6, 6)))


def test_std_ratio_mde_shrinks_with_n_and_is_symmetric() -> None:
    ups = [pw.std_ratio_mde(n, n)[1] for n in (6, 8, 10, 15, 20, 30)]
    assert all(a > b > 1 for a, b in zip(ups, ups[1:], strict=False))
    for n in (8, 15):
        down, up = pw.std_ratio_mde(n, n)
        assert down == pytest.approx(1 / up, rel=1e-12)  # the same draws, the groups swapped
    down, up = pw.std_ratio_mde(10, 6)
    assert (down, up) == pytest.approx((1 / pw.std_ratio_mde(6, 10)[1],
                                        1 / pw.std_ratio_mde(6, 10)[0]))


def test_std_ratio_mde_needs_three_a_group() -> None:
    assert all(np.isnan(pw.std_ratio_mde(2, 10)))
    assert all(np.isnan(pw.std_ratio_mde(10, 2)))


# --- failure rate: Fisher's exact test ---------------------------------------------------

def fisher_p(k: int, n: int, k_ref: int, n_ref: int) -> Fraction:
    """Fisher's two-sided p, written out with exact fractions: the probability, given both
    margins, of the tables no more likely than this one (hypergeometric)."""
    m, total = k + k_ref, n + n_ref

    def table(j: int) -> Fraction:
        return Fraction(math.comb(n, j) * math.comb(n_ref, m - j), math.comb(total, m))

    here = table(k)
    return sum((table(j) for j in range(max(0, m - n_ref), min(n, m) + 1)
                if table(j) <= here), Fraction(0))


@cache
def rejected(n: int, n_ref: int) -> tuple[tuple[int, int], ...]:
    return tuple((k, k_ref) for k in range(n + 1) for k_ref in range(n_ref + 1)
                 if fisher_p(k, n, k_ref, n_ref) < Fraction(ALPHA))


def brute_power(rate: float, rate_ref: float, n: int, n_ref: int) -> float:
    def binomial(k: int, size: int, p: float) -> float:
        return math.comb(size, k) * p**k * (1 - p) ** (size - k)

    return sum(binomial(k, n, rate) * binomial(k_ref, n_ref, rate_ref)
               for k, k_ref in rejected(n, n_ref))


@pytest.mark.parametrize(("n", "n_ref", "k_ref"), [(5, 5, 1), (8, 6, 2), (10, 10, 0), (12, 9, 3)])
def test_fisher_power_against_brute_force(n: int, n_ref: int, k_ref: int) -> None:
    rates = np.array([0.0, 0.1, 0.37, 0.8, 1.0])
    assert pw.fisher_power(rates, k_ref / n_ref, n, n_ref) == pytest.approx(
        [brute_power(r, k_ref / n_ref, n, n_ref) for r in rates], abs=1e-12)


@pytest.mark.parametrize(("n", "n_ref", "k_ref"),
                         [(10, 10, 2), (12, 12, 6), (10, 10, 8), (10, 8, 4), (12, 12, 0)])
def test_failure_mde_is_the_nearest_rate_with_power(n: int, n_ref: int, k_ref: int) -> None:
    rate_ref = k_ref / n_ref
    for side, end in zip(pw.failure_mde(k_ref, n, n_ref), (0.0, 1.0), strict=True):
        if np.isnan(side):  # no rate on this side reaches it: not even 0 or 1
            assert brute_power(end, rate_ref, n, n_ref) < POWER
            continue
        assert brute_power(rate_ref + side, rate_ref, n, n_ref) == pytest.approx(POWER, abs=1e-9)
        nearer = rate_ref + side * np.linspace(0, 1, 200)[:-1] * (1 - 1e-6)
        assert max(brute_power(r, rate_ref, n, n_ref) for r in nearer) < POWER


def test_failure_mde_hand_worked_at_five_a_group() -> None:
    # none 0/5: 4/5 or 5/5 against 0/5 reject (p = 12/252), 3/5 does not (p = 42/252); so the
    # power is P(k >= 4) = 5 p^4 (1 - p) + p^5, 0.8 at the increase; nothing below 0%.
    assert fisher_p(4, 5, 0, 5) == Fraction(12, 252) and fisher_p(3, 5, 0, 5) == Fraction(42, 252)
    down, up = pw.failure_mde(0, 5, 5)
    assert up == pytest.approx(optimize.brentq(lambda p: 5 * p**4 - 4 * p**5 - POWER, 0, 1))
    assert np.isnan(down)
    # none 1/5: even a rate of 100% rejects only when none has at most 1 failure:
    # 0.8^5 + 5 * 0.2 * 0.8^4 = 0.73728 < 0.8, so no increase is detectable; nor a decrease.
    assert pw.fisher_power(1.0, 0.2, 5, 5)[0] == pytest.approx(0.73728, abs=1e-12)
    assert all(np.isnan(pw.failure_mde(1, 5, 5)))


def test_failure_mde_needs_a_finished_run_a_group() -> None:
    assert all(np.isnan(pw.failure_mde(0, 0, 5)))
    assert all(np.isnan(pw.failure_mde(0, 5, 0)))


# --- in the report ------------------------------------------------------------------------

def report(tmp_path: Path, none: list[float], llrd: list[float]) -> tuple[pd.Series, str]:
    root = tmp_path / "sweep"
    for stabilizer, values in (("none", none), ("llrd", llrd)):
        for seed, score in enumerate(values):
            write_run(root, stabilizer=stabilizer, seed=seed, test=(score, score),
                      dev=(score, score))
    written = make_report([root], tmp_path / "report")
    return pd.read_csv(written["verdict.csv"]).iloc[0], written["verdict.md"].read_text()


def test_verdict_row_carries_the_power_line(tmp_path: Path) -> None:
    none = [0.70, 0.74, 0.78, 0.72, 0.76, 0.71, 0.75, 0.73, 0.77, 0.69]
    llrd = [0.73, 0.74, 0.80, 0.71, 0.79, 0.70, 0.79, 0.72, 0.80, 0.74]
    row, md = report(tmp_path, none, llrd)
    sd = np.std(np.subtract(llrd, none), ddof=1)  # of the paired differences, not the scores
    assert t_power_by_integral(row.mean_mde, sd, 10) == pytest.approx(POWER, abs=1e-6)
    assert (row.std_ratio_mde_down, row.std_ratio_mde_up) == pytest.approx(pw.std_ratio_mde(10, 10))
    assert np.isnan(row.fail_mde_down)  # none failed: no lower rate
    assert brute_power(row.fail_mde_up, 0.0, 10, 10) == pytest.approx(POWER, abs=1e-9)
    cell = (f"| |Δ mean| ≥ {100 * row.mean_mde:.1f}; std ratio ≤ {row.std_ratio_mde_down:.2f} "
            f"or ≥ {row.std_ratio_mde_up:.2f}; failure rate +{100 * row.fail_mde_up:.0f} pp / "
            "none lower at this n |").replace("|Δ mean|", "\\|Δ mean\\|")
    assert cell in md
    assert "Detectable at this n (α 0.05, power 0.8)" in md


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy on the degenerate input
def test_no_p_no_power_the_cell_says_why(tmp_path: Path) -> None:
    row, md = report(tmp_path, [0.70, 0.74], [0.70, 0.7424])
    assert np.isnan(row.std_ratio_mde_down) and np.isnan(row.std_ratio_mde_up)
    assert row.brown_forsythe_note == "n too small: 2 vs 2, needs ≥3 a group"
    assert "std ratio: n too small: 2 vs 2, needs ≥3 a group" in md
    assert np.isfinite(row.mean_mde)  # 2 pairs are enough for the t-test
