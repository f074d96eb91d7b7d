"""The report answers the stability question: failures, spread, the verdict and the plots,
on fabricated runs with known numbers, checked against scipy and hand-worked values."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_runs import grad_diagnostics, write_run
from scipy import stats as sps

from blurbtune.report import make_report
from blurbtune.report.cli import main
from blurbtune.report.plots import part_order
from blurbtune.report.stability import verdict
from blurbtune.report.stats import wilson_interval

Z = 1.959963984540054  # the normal 97.5% quantile

# seed -> (test score, how it ends); None = diverged (no test score)
NONE = {0: 0.70, 1: 0.02, 2: 0.74, 3: None, 4: 0.72, 5: -0.05}
COLLAPSED = {1}  # constant test predictions
REINIT = {0: 0.75, 1: 0.77, 2: 0.76, 3: 0.74, 4: 0.78, 5: 0.73}


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval, written out (Wilson 1927)."""
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
    return centre - half, centre + half


def write_scores(root: Path, stabilizer: str, scores: dict[int, float | None],
                 collapsed: set[int] = frozenset(), **kwargs) -> None:
    for seed, score in scores.items():
        write_run(root, stabilizer=stabilizer, seed=seed,
                  status="diverged" if score is None else "completed",
                  test=None if score is None else (score, score),
                  dev=None if score is None else (score, score),
                  collapsed_test=seed in collapsed, **kwargs)


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    write_scores(root, "none", NONE, COLLAPSED)
    write_scores(root, "reinit_top", REINIT)
    return root


def test_wilson_interval_hand_worked() -> None:
    assert wilson_interval(2, 5) == pytest.approx((0.1176, 0.7693), abs=1e-4)
    assert wilson_interval(3, 6) == pytest.approx((0.1876, 0.8124), abs=1e-4)
    assert wilson_interval(0, 6) == pytest.approx((0.0, 0.3903), abs=1e-4)
    for k, n in ((0, 5), (1, 6), (7, 10), (10, 10)):
        assert wilson_interval(k, n) == pytest.approx(wilson(k, n), abs=1e-12)
    assert all(np.isnan(wilson_interval(0, 0)))


def test_failures_and_spread_per_configuration(study: Path, tmp_path: Path) -> None:
    summary = pd.read_csv(make_report([study], tmp_path / "out")["summary.csv"]).set_index(
        "stabilizer")
    none, reinit = summary.loc["none"], summary.loc["reinit_top"]
    # none: seed 1 collapsed, seed 3 diverged, seed 5 below the constant predictor (0.0)
    assert (none.failures, none.finished, none.diverged, none.degenerate) == (3, 6, 1, 2)
    assert (reinit.failures, reinit.finished) == (0, 6)
    assert none.failure_rate == pytest.approx(0.5)
    assert (none.failure_ci_low, none.failure_ci_high) == pytest.approx(wilson(3, 6))
    assert (reinit.failure_ci_low, reinit.failure_ci_high) == pytest.approx(wilson(0, 6))
    for row, scores in ((none, NONE), (reinit, REINIT)):
        values = [s for s in scores.values() if s is not None]  # diverged: no test score
        assert row.n == len(values)
        assert row.test_best_std == pytest.approx(statistics.stdev(values))
        # 5 and 6 runs: too few for a 95% interval of the std (test_report_sample_size)
        assert np.isnan(row.test_best_std_ci_low) and np.isnan(row.test_best_std_ci_high)
        assert row.test_best_std_ci_note == f"n too small: {len(values)}, needs ≥11"
    md = (tmp_path / "out" / "stability.md").read_text()
    assert "| minilm | biosses | none | - | 3e-05 | 16 | 3/6 | 50% [19%, 81%] | 5 |" in md
    assert "diverged runs have no test score" in md


def test_verdict_row_against_scipy(study: Path, tmp_path: Path) -> None:
    written = make_report([study], tmp_path / "out")
    row = pd.read_csv(written["verdict.csv"]).iloc[0]
    assert (row.stabilizer, row.n_pairs) == ("reinit_top", 5)
    paired = [s for s, v in NONE.items() if v is not None]
    treated, reference = [REINIT[s] for s in paired], [NONE[s] for s in paired]
    assert row.mean_diff == pytest.approx(np.mean(np.subtract(treated, reference)))
    assert row.ttest_p == pytest.approx(sps.ttest_rel(treated, reference).pvalue)
    completed_none = [v for v in NONE.values() if v is not None]
    all_reinit = list(REINIT.values())
    assert (row.n_std, row.n_std_ref) == (6, 5)
    assert row.std_ratio == pytest.approx(statistics.stdev(all_reinit)
                                          / statistics.stdev(completed_none))
    assert row.brown_forsythe_p == pytest.approx(
        sps.levene(all_reinit, completed_none, center="median").pvalue)
    assert (row.failures, row.finished, row.failures_ref, row.finished_ref) == (0, 6, 3, 6)
    assert row.failure_rate_diff == pytest.approx(-0.5)
    assert row.fisher_p == pytest.approx(sps.fisher_exact([[0, 6], [3, 3]]).pvalue)
    md = written["verdict.md"].read_text()
    assert f"0/6 vs 3/6 (-50 pp, p={row.fisher_p:.3f})" in md
    assert "n=5 pairs" in md and "n=6 vs 5" in md


def verdict_of(root: Path, out: Path, none: list, treated: list,
               collapsed: set[int] = frozenset()) -> pd.Series:
    write_scores(root, "none", dict(enumerate(none)), collapsed)
    write_scores(root, "llrd", dict(enumerate(treated)))
    return pd.read_csv(make_report([root], out)["verdict.csv"]).iloc[0]


GOOD = [0.75, 0.77, 0.74, 0.76, 0.78, 0.73, 0.75, 0.77, 0.74, 0.76]
COLLAPSING = [0.70, 0.72, 0.71, 0.73, 0.69, 0.0, 0.01, 0.0, 0.02, 0.0]  # 5 of 10 collapse


def test_verdict_clearly_better_and_worse(tmp_path: Path) -> None:
    assert sps.fisher_exact([[0, 10], [5, 5]]).pvalue < 0.05
    assert sps.ttest_rel(GOOD, COLLAPSING).pvalue < 0.05
    assert sps.levene(GOOD, COLLAPSING, center="median").pvalue < 0.05
    better = verdict_of(tmp_path / "a", tmp_path / "a_out", COLLAPSING, GOOD, set(range(5, 10)))
    assert better.verdict == "better (mean, std, failures)"
    assert (better.mean_word, better.std_word, better.failures_word) == ("better",) * 3

    root = tmp_path / "b"  # the same numbers, roles swapped
    write_scores(root, "none", dict(enumerate(GOOD)))
    write_scores(root, "llrd", dict(enumerate(COLLAPSING)), collapsed=set(range(5, 10)))
    worse = pd.read_csv(make_report([root], tmp_path / "b_out")["verdict.csv"]).iloc[0]
    assert worse.verdict == "worse (mean, std, failures)"


def test_verdict_no_difference_at_this_n(tmp_path: Path, capsys) -> None:
    none, llrd = [0.70, 0.74, 0.78, 0.72, 0.76], [0.73, 0.74, 0.80, 0.71, 0.79]
    assert sps.ttest_rel(llrd, none).pvalue > 0.05
    assert sps.levene(llrd, none, center="median").pvalue > 0.05
    row = verdict_of(tmp_path / "s", tmp_path / "out", none, llrd)
    assert row.verdict == "no difference at this n"
    assert main([str(tmp_path / "s"), "--out", str(tmp_path / "out2")]) == 0
    out = capsys.readouterr().out
    assert "Verdict: each stabilizer against `none`" in out
    assert "| no difference at this n |" in out and "n=5 pairs" in out


def test_verdict_mixed(tmp_path: Path) -> None:
    jitter = np.array([1, -1, 2, -2, 0, 1, -1, 2, -2, 0])
    none = (0.70 + 0.001 * jitter).tolist()
    llrd = (0.80 + 0.02 * np.array([1.5, -1.5, 2, -2, 1, -1, 1.5, -1.5, 2, -2])).tolist()
    assert sps.ttest_rel(llrd, none).pvalue < 0.05
    assert sps.levene(llrd, none, center="median").pvalue < 0.05
    row = verdict_of(tmp_path / "s", tmp_path / "out", none, llrd)
    assert row.verdict == "mixed (better: mean; worse: std)"
    assert row.failures_word == "no difference"


def test_verdict_words() -> None:
    assert verdict({"mean": "better", "std": "no difference", "failures": "no difference"}) == \
        "better (mean)"
    assert verdict({"mean": "no difference", "std": "worse", "failures": "worse"}) == \
        "worse (std, failures)"
    assert verdict({"mean": "no difference", "std": "no difference", "failures": "no difference"}
                   ) == "no difference at this n"


def test_comparison_only_within_an_otherwise_identical_configuration(tmp_path: Path) -> None:
    """`none` at lr 3e-5 is no reference for llrd at lr 1e-4: llrd's verdict row says it was
    not compared, with no number in it."""
    root = tmp_path / "s"
    write_scores(root, "none", {0: 0.7, 1: 0.72})
    write_scores(root, "llrd", {0: 0.75, 1: 0.71}, lr=1e-4)
    written = make_report([root], tmp_path / "out")
    [row] = pd.read_csv(written["verdict.csv"]).itertuples()
    assert row.stabilizer == "llrd" and row.verdict.startswith("not compared: ")
    assert pd.isna(row.ref_config) and pd.isna(row.mean_diff) and pd.isna(row.n_pairs)
    assert pd.read_csv(written["paired.csv"]).empty


def test_stability_plots_are_written(tmp_path: Path, capsys) -> None:
    root = tmp_path / "s"
    for stabilizer, collapse in (("none", {1, 3}), ("reinit_top", set()), ("llrd", {2})):
        for seed in range(4):
            failed = seed in collapse
            curve = [0.0 if failed else 0.2 * (e + 1) for e in range(4)]
            write_run(root, stabilizer=stabilizer, seed=seed, collapsed_test=failed,
                      history=[{"epoch": e, "dev": d, "train_loss": 1.0, "lr_top": 1e-5}
                               for e, d in enumerate(curve)],
                      diagnostics=grad_diagnostics(0.01 if failed else 1.0))
    write_run(root, stabilizer="llrd", seed=9, status="diverged", test=None, dev=None,
              history=[{"epoch": 0, "dev": 0.1}, {"epoch": 1, "dev": None}])  # no diagnostics
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for name in ("dev_curves_biosses_minilm.png", "grad_norm_early_biosses_minilm.png"):
        assert (tmp_path / "out" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in out
    assert "Note: No run records" not in out
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs.clip_fraction.dropna().eq(0.35).all() and runs.failure.sum() == 4


def test_older_runs_skip_the_new_plots_with_a_note(study: Path, tmp_path: Path, capsys) -> None:
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Note: No run records a per-epoch dev history: no dev-curve plot." in out
    assert "Note: No run records early gradient norms" in out
    assert not list((tmp_path / "out" / "plots").glob("dev_curves_*"))
    assert not list((tmp_path / "out" / "plots").glob("grad_norm_early_*"))


def test_part_order() -> None:
    parts = {"head", "layer.10", "layer.2", "pooler", "total", "embeddings", "layer.0", "extra"}
    assert part_order(parts) == ["embeddings", "layer.0", "layer.2", "layer.10", "pooler",
                                 "head", "extra"]
