"""No statistic claims more than its sample allows: below a test's minimum n (or where its
statistic is undefined) the report says so instead of a p-value, and no verdict rests on it.
The minima are checked against scipy, hand-worked numbers and simulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_runs import write_run
from scipy import stats as sps

from blurbtune.report import make_report
from blurbtune.report import sample_size as ss
from blurbtune.report.stability import failure_test, spread_test, verdict
from blurbtune.report.stats import bootstrap_ci, paired_test, sample_std


def scores(root: Path, stabilizer: str, values: list[float]) -> None:
    for seed, score in enumerate(values):
        write_run(root, stabilizer=stabilizer, seed=seed, test=(score, score),
                  dev=(score, score))


def verdict_row(tmp_path: Path, none: list[float], llrd: list[float]) -> tuple[pd.Series, str]:
    root = tmp_path / "sweep"
    scores(root, "none", none)
    scores(root, "llrd", llrd)
    written = make_report([root], tmp_path / "report")
    return pd.read_csv(written["verdict.csv"]).iloc[0], written["verdict.md"].read_text()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy on the degenerate input
def test_two_runs_a_group_give_no_std_claim(tmp_path: Path) -> None:
    """The issue's case: 2 vs 2 printed `Std ratio 1.06 (p=<0.001, n=2 vs 2) ... worse (std)`."""
    none, llrd = [0.70, 0.74], [0.70, 0.7424]
    degenerate = sps.levene(llrd, none, center="median")  # what the old report printed
    assert np.isinf(degenerate.statistic) and degenerate.pvalue == 0.0
    row, md = verdict_row(tmp_path, none, llrd)
    assert row.std_ratio == pytest.approx(np.std(llrd, ddof=1) / np.std(none, ddof=1))
    assert np.isnan(row.brown_forsythe_p) and row.std_word == "not tested"
    assert "1.06 (n too small: 2 vs 2, needs ≥3 a group)" in md
    assert row.verdict == "no difference at this n (not tested: std)"
    assert "worse" not in md.split("\n\n")[0]


def test_brown_forsythe_minimum_is_where_the_deviations_can_vary() -> None:
    """With 2 values both lie |x1 - x2| / 2 from their median; with 3 they need not."""
    for pair in ([0.1, 0.5], [0.3, 0.31], [-1.0, 2.0]):
        deviations = np.abs(np.array(pair) - np.median(pair))
        assert deviations[0] == pytest.approx(deviations[1])
    assert ss.BROWN_FORSYTHE_GROUP == 3
    a, b = [0.70, 0.74, 0.79], [0.71, 0.72, 0.78, 0.80]
    out = spread_test(a, b)
    assert out["brown_forsythe_note"] == ""
    assert out["brown_forsythe_p"] == pytest.approx(sps.levene(a, b, center="median").pvalue)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy on the degenerate input
@pytest.mark.parametrize("treated, reference", [
    ([0.70, 0.70, 0.72, 0.72], [0.71, 0.71, 0.71, 0.71]),  # each |x - median| = 0.01, or 0
    ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),  # all equal
])
def test_brown_forsythe_undefined_when_no_deviation_varies(treated, reference) -> None:
    old = sps.levene(treated, reference, center="median")
    assert np.isinf(old.statistic) or np.isnan(old.pvalue)
    out = spread_test(treated, reference)
    assert np.isnan(out["brown_forsythe_p"])
    assert out["brown_forsythe_note"].startswith("deviations from the median equal")


def test_spread_leaves_nans_out() -> None:
    a, b = [0.70, np.nan, 0.74, 0.79], [0.71, 0.72, 0.78, np.nan]
    out = spread_test(a, b)
    assert (out["n_std"], out["n_std_ref"]) == (3, 3)
    clean_a, clean_b = [0.70, 0.74, 0.79], [0.71, 0.72, 0.78]
    assert out["std"] == pytest.approx(np.std(clean_a, ddof=1))
    assert out["brown_forsythe_p"] == pytest.approx(
        sps.levene(clean_a, clean_b, center="median").pvalue)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy on the degenerate input
def test_equal_differences_leave_the_t_test_undefined(tmp_path: Path) -> None:
    """+0.05 on every seed: in floats the differences differ by 1e-17, and the old report
    printed p≈5e-31 and `better (mean)`."""
    none, llrd = [0.70, 0.75, 0.80], [0.75, 0.80, 0.85]
    assert sps.ttest_rel(llrd, none).pvalue < 1e-20  # rounding noise, read as a certainty
    out = paired_test(llrd, none)
    assert np.isnan(out["ttest_p"]) and out["ttest_note"] == "all 3 differences equal, t undefined"
    assert out["mean_diff"] == pytest.approx(0.05)
    row, md = verdict_row(tmp_path, none, llrd)
    assert row.mean_word == "not tested"
    assert "+5.00 (all 3 differences equal, t undefined, n=3 pairs)" in md
    assert row.verdict == "no difference at this n (not tested: mean)"


def test_t_test_needs_two_pairs_and_matches_scipy_from_two() -> None:
    one = paired_test([0.5], [0.4])
    assert np.isnan(one["ttest_p"]) and one["ttest_note"] == "n too small: 1 pair, needs ≥2"
    two = paired_test([0.5, 0.7], [0.4, 0.65])
    assert two["ttest_note"] == ""
    assert two["ttest_p"] == pytest.approx(sps.ttest_rel([0.5, 0.7], [0.4, 0.65]).pvalue)


def test_pairs_with_a_nan_are_left_out() -> None:
    out = paired_test([0.7, np.nan, 0.8, 0.9], [0.6, 0.7, np.nan, 0.85])
    assert out["n"] == 2 and out["mean_diff"] == pytest.approx(0.075)
    assert out["ttest_p"] == pytest.approx(sps.ttest_rel([0.7, 0.9], [0.6, 0.85]).pvalue)


def test_wilcoxon_minimum_is_where_its_p_can_reach_alpha() -> None:
    assert ss.wilcoxon_min(0.05) == 6 and ss.wilcoxon_min(0.01) == 8  # 2/2^n: 1/32, 1/128
    assert sps.wilcoxon([0.1, 0.2, 0.3, 0.4, 0.5]).pvalue == pytest.approx(2 / 2**5)
    assert sps.wilcoxon([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).pvalue == pytest.approx(2 / 2**6)
    five = paired_test([0.8, 0.9, 0.7, 0.6, 0.75, 0.5], [0.7, 0.7, 0.6, 0.65, 0.70, 0.5])
    assert five["ties"] == 1 and np.isnan(five["wilcoxon_p"])
    assert five["wilcoxon_note"] == "n too small: 5 non-zero differences, needs ≥6"
    treated, reference = [0.8, 0.9, 0.7, 0.6, 0.75, 0.52], [0.7, 0.7, 0.6, 0.65, 0.70, 0.5]
    six = paired_test(treated, reference)
    assert six["wilcoxon_p"] == pytest.approx(sps.wilcoxon(treated, reference).pvalue)


def test_wilcoxon_sees_rounding_noise_as_one_value() -> None:
    """0.80 - 0.75 and 0.75 - 0.70 are one difference, not two ranks."""
    treated = [0.75, 0.80, 0.70, 0.90, 0.65, 0.60]
    reference = [0.70, 0.75, 0.60, 0.70, 0.70, 0.50]
    diffs = np.round(np.subtract(treated, reference), 12)
    assert paired_test(treated, reference)["wilcoxon_p"] == pytest.approx(
        sps.wilcoxon(diffs).pvalue)


def test_fisher_needs_a_finished_run_on_each_side() -> None:
    out = failure_test(0, 0, 2, 5)
    assert np.isnan(out["fisher_p"])
    assert out["fisher_note"] == "n too small: 0 vs 5 finished, needs ≥1 a group"
    one = failure_test(1, 1, 0, 1)  # exact from one run a side: p = 1
    assert one["fisher_note"] == "" and one["fisher_p"] == pytest.approx(
        sps.fisher_exact([[1, 0], [0, 1]]).pvalue)


def test_bootstrap_mean_minimum_against_the_coverage_of_min_max() -> None:
    """[min, max] misses a symmetric distribution's centre with probability 2/2^n, and every
    percentile interval of the mean lies inside [min, max]."""
    assert ss.bootstrap_mean_min(0.95) == 6
    rng = np.random.default_rng(1)
    for n, expected in ((5, 1 - 2 / 32), (6, 1 - 2 / 64)):
        draws = rng.standard_normal((200_000, n))
        covered = ((draws.min(axis=1) <= 0) & (draws.max(axis=1) >= 0)).mean()
        assert covered == pytest.approx(expected, abs=0.003)


def test_bootstrap_std_minimum_against_simulation() -> None:
    """The widest percentile interval of the std is [0, largest resampled std]; for normal
    scores it covers sigma less than 95% of the time up to n = 10."""
    assert ss.bootstrap_std_min(0.95) == 11
    rng = np.random.default_rng(2)
    for n, low, high in ((10, 0.935, 0.95), (11, 0.95, 0.97)):
        draws = rng.standard_normal((200_000, n))
        k = n // 2
        widest = np.ptp(draws, axis=1) * np.sqrt(k * (n - k) / (n * (n - 1)))
        assert low < (widest >= 1.0).mean() < high
        # that largest std is reached: half the draws at the min, half at the max
        sample = draws[0]
        extreme = np.r_[[sample.min()] * k, [sample.max()] * (n - k)]
        assert np.std(extreme, ddof=1) == pytest.approx(widest[0])


def test_bootstrap_ci_below_and_above_its_minimum() -> None:
    five = [0.70, 0.74, 0.78, 0.72, 0.76]
    assert all(np.isnan(bootstrap_ci(five)))
    six = [*five, 0.71]
    expected = sps.bootstrap((np.array(six),), np.mean, confidence_level=0.95, n_resamples=9999,
                             method="percentile", rng=np.random.default_rng(0))
    assert bootstrap_ci(six) == pytest.approx(tuple(expected.confidence_interval))
    ten = [*six, 0.73, 0.77, 0.75, 0.69]
    assert all(np.isnan(bootstrap_ci(ten, statistic=sample_std)))
    eleven = [*ten, 0.80]
    expected = sps.bootstrap((np.array(eleven),), lambda x, axis: np.std(x, ddof=1, axis=axis),
                             confidence_level=0.95, n_resamples=9999, method="percentile",
                             rng=np.random.default_rng(0))
    assert bootstrap_ci(eleven, statistic=sample_std) == pytest.approx(
        tuple(expected.confidence_interval))
    assert bootstrap_ci([0.5] * 6) == (0.5, 0.5)  # no spread: a zero-width interval
    assert all(np.isnan(bootstrap_ci([0.7, np.nan, 0.8, 0.6, 0.75, 0.72])))  # 5 values


def test_tables_say_n_too_small_for_intervals(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    scores(root, "none", [0.70, 0.74, 0.78, 0.72, 0.76])
    written = make_report([root], tmp_path / "report")
    row = pd.read_csv(written["summary.csv"]).iloc[0]
    assert np.isnan(row.test_best_ci_low) and row.test_best_ci_note == "n too small: 5, needs ≥6"
    assert row.test_best_std_ci_note == "n too small: 5, needs ≥11"
    assert "| n too small: 5, needs ≥6 |" in written["summary.md"].read_text()
    assert "(n too small: 5, needs ≥11)" in written["stability.md"].read_text()


def test_verdict_names_what_it_could_not_test() -> None:
    words = {"mean": "better", "std": "not tested", "failures": "no difference"}
    assert verdict(words) == "better (mean; not tested: std)"
    assert verdict(dict.fromkeys(words, "not tested")) == "not tested at this n"
    assert verdict({"mean": "no difference", "std": "not tested", "failures": "not tested"}
                   ) == "no difference at this n (not tested: std, failures)"
    assert verdict({"mean": "better", "std": "worse", "failures": "not tested"}
                   ) == "mixed (better: mean; worse: std; not tested: failures)"
