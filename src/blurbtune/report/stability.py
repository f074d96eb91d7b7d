"""Does a stabilizer make fine-tuning stable? Each stabilizer against `none`, three ways.

For each configuration whose otherwise identical `none` configuration is in the sweep:

- mean: the test score's mean difference over the seeds both completed, paired t-test;
- spread: the ratio of the test scores' standard deviations (completed runs), Brown-Forsythe
  test (Levene's test about the median);
- failures: the difference of the failure rates (diverged or degenerate, over finished runs),
  Fisher's exact test.

Each is "better", "worse" or "no difference" at ALPHA on its own test (two-sided): better is a
higher mean, a smaller std, fewer failures. The verdict is "better" when at least one is better
and none is worse, "worse" the other way round, "mixed" when they disagree (one better, one
worse), and "no difference at this n" when none is significant (or none could be tested).
The paired t-test, not the Wilcoxon test of paired.csv: with 5 pairs the Wilcoxon p cannot
go below 0.06.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from blurbtune.report.identity import Configs
from blurbtune.report.stats import (
    GROUP,
    comparisons,
    completed,
    finished,
    is_failure,
    pair_up,
    paired_test,
)

ALPHA = 0.05
BETTER, WORSE, SAME = "better", "worse", "no difference"
NO_DIFFERENCE = "no difference at this n"
MIXED = "mixed"
DIMENSIONS = ("mean", "std", "failures")


def spread_test(treated: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Std of each (ddof=1), their ratio treated/reference and the Brown-Forsythe p."""
    treated = np.asarray(treated, float)[~np.isnan(np.asarray(treated, float))]
    reference = np.asarray(reference, float)[~np.isnan(np.asarray(reference, float))]
    std_t = float(np.std(treated, ddof=1)) if len(treated) > 1 else float("nan")
    std_r = float(np.std(reference, ddof=1)) if len(reference) > 1 else float("nan")
    ratio = std_t / std_r if std_r > 0 else float("nan")
    if std_r == 0 and std_t > 0:  # no spread in `none`: any spread is infinitely more
        ratio = float("inf")
    p = float("nan")
    if len(treated) > 1 and len(reference) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-equal samples: scipy says nan and warns
            p = float(stats.levene(treated, reference, center="median").pvalue)
    return {"n_std": len(treated), "n_std_ref": len(reference), "std": std_t, "std_ref": std_r,
            "std_ratio": ratio, "brown_forsythe_p": p}


def failure_test(k: int, n: int, k_ref: int, n_ref: int) -> dict[str, Any]:
    """Failure rates k/n and k_ref/n_ref, their difference and Fisher's exact p (two-sided)."""
    rate = k / n if n else float("nan")
    rate_ref = k_ref / n_ref if n_ref else float("nan")
    p = float("nan")
    if n and n_ref:
        p = float(stats.fisher_exact([[k, n - k], [k_ref, n_ref - k_ref]]).pvalue)
    return {"failures": k, "finished": n, "failures_ref": k_ref, "finished_ref": n_ref,
            "failure_rate_diff": rate - rate_ref, "fisher_p": p}


def word(p: float, better: bool) -> str:
    """better / worse / no difference for one test at ALPHA."""
    if pd.isna(p) or p >= ALPHA:
        return SAME
    return BETTER if better else WORSE


def verdict(words: dict[str, str]) -> str:
    """One word from the three dimensions' words, with the dimensions that decided it."""
    better = [d for d in DIMENSIONS if words.get(d) == BETTER]
    worse = [d for d in DIMENSIONS if words.get(d) == WORSE]
    if better and worse:
        return f"{MIXED} (better: {', '.join(better)}; worse: {', '.join(worse)})"
    if better:
        return f"{BETTER} ({', '.join(better)})"
    if worse:
        return f"{WORSE} ({', '.join(worse)})"
    return NO_DIFFERENCE


def compare(group: pd.DataFrame, reference: pd.DataFrame, column: str = "test_best"
            ) -> dict[str, Any]:
    """The three comparisons of one configuration's runs with its `none` runs, and the verdict."""
    pairs = pair_up(group, reference, column)
    mean = paired_test(pairs[column].to_numpy(), pairs[f"{column}_ref"].to_numpy())
    spread = spread_test(completed(group)[column].to_numpy(),
                         completed(reference)[column].to_numpy())
    done, done_ref = finished(group), finished(reference)
    fails = failure_test(int(is_failure(done).sum()), len(done),
                         int(is_failure(done_ref).sum()), len(done_ref))
    words = {
        "mean": word(mean["ttest_p"], mean["mean_diff"] > 0),
        "std": word(spread["brown_forsythe_p"], spread["std_ratio"] < 1),
        "failures": word(fails["fisher_p"], fails["failure_rate_diff"] < 0),
    }
    return ({"n_pairs": mean["n"], "mean_diff": mean["mean_diff"], "ttest_p": mean["ttest_p"]}
            | spread | fails | {f"{d}_word": w for d, w in words.items()}
            | {"verdict": verdict(words)})


VERDICT_COLUMNS = [
    GROUP, "ref_config", "n_pairs", "mean_diff", "ttest_p",
    "n_std", "n_std_ref", "std", "std_ref", "std_ratio", "brown_forsythe_p",
    "failures", "finished", "failures_ref", "finished_ref", "failure_rate_diff", "fisher_p",
    "mean_word", "std_word", "failures_word", "verdict",
]  # fmt: skip


def verdicts(runs: pd.DataFrame, configs: Configs, column: str = "test_best") -> pd.DataFrame:
    """One row per comparison (each stabilizer configuration against its `none`)."""
    groups = dict(list(runs.groupby(GROUP, sort=False)))
    rows = [{GROUP: config, "ref_config": ref} | compare(groups[config], groups[ref], column)
            for config, ref in comparisons(configs, runs)]
    return configs.describe(pd.DataFrame(rows, columns=VERDICT_COLUMNS))
