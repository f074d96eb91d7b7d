"""Does a stabilizer make fine-tuning stable? Each stabilizer against `none`, three ways.

For each configuration whose otherwise identical `none` configuration is in the sweep:

- mean: the test score's mean difference over the seeds both completed, paired t-test;
- spread: the ratio of the test scores' standard deviations (completed runs), Brown-Forsythe
  test (Levene's test about the median);
- failures: the difference of the failure rates (diverged or degenerate, over finished runs),
  Fisher's exact test.

Each is "better", "worse" or "no difference" at ALPHA on its own test (two-sided): better is a
higher mean, a smaller std, fewer failures; "not tested" when the test's minimum n is not met
(report/sample_size.py), so that no word rests on a test that cannot mean anything. The verdict
is "better" when at least one is better and none is worse, "worse" the other way round,
"mixed" when they disagree (one better, one worse), "no difference at this n" when none is
significant, and "not tested at this n" when no test could be run; the dimensions not tested
are named beside the word. The paired t-test, not the Wilcoxon test of paired.csv: with 5
pairs the Wilcoxon p cannot go below 0.06.

Beside each, the smallest difference its test could detect at this n (report/power.py); none
where the test has no p.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from blurbtune.report import power, sample_size
from blurbtune.report.constants import ALPHA, REFERENCE_STABILIZER, number
from blurbtune.report.identity import Configs
from blurbtune.report.stats import (
    GROUP,
    comparisons,
    completed,
    finished,
    is_failure,
    pair_up,
    paired_test,
    stat_columns,
)

BETTER, WORSE, SAME = "better", "worse", "no difference"
NOT_TESTED = "not tested"
NO_DIFFERENCE = "no difference at this n"
NOTHING_TESTED = "not tested at this n"
MIXED = "mixed"
NOT_COMPARED = "not compared"
DIMENSIONS = ("mean", "std", "failures")


def spread_test(treated: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Std of each (ddof=1), their ratio treated/reference and the Brown-Forsythe p.

    NaNs are left out. No p below sample_size.BROWN_FORSYTHE_GROUP values a group, nor when
    every group's absolute deviations from its median are equal (two values a group; all
    values equal; half at one value and half at another): the within-group variance of the
    deviations is then 0 and the statistic infinite or undefined. `brown_forsythe_note` says
    which.
    """
    treated = np.asarray(treated, float)[~np.isnan(np.asarray(treated, float))]
    reference = np.asarray(reference, float)[~np.isnan(np.asarray(reference, float))]
    std_t = float(np.std(treated, ddof=1)) if len(treated) > 1 else float("nan")
    std_r = float(np.std(reference, ddof=1)) if len(reference) > 1 else float("nan")
    ratio = std_t / std_r if std_r > 0 else float("nan")
    if std_r == 0 and std_t > 0:  # no spread in `none`: any spread is infinitely more
        ratio = float("inf")
    p, note = float("nan"), brown_forsythe_note(treated, reference)
    if not note:
        p = float(stats.levene(treated, reference, center="median").pvalue)
    return {"n_std": len(treated), "n_std_ref": len(reference), "std": std_t, "std_ref": std_r,
            "std_ratio": ratio, "brown_forsythe_p": p, "brown_forsythe_note": note}


def brown_forsythe_note(*groups: np.ndarray) -> str:
    """Why the Brown-Forsythe test cannot be run on these groups ("" when it can)."""
    need = sample_size.BROWN_FORSYTHE_GROUP
    if min(len(g) for g in groups) < need:
        sizes = " vs ".join(str(len(g)) for g in groups)
        return sample_size.too_small(sizes, f"≥{need} a group")
    deviations = [np.abs(g - np.median(g)) for g in groups]
    if all(np.ptp(d) <= sample_size.EQUAL for d in deviations):
        return "deviations from the median equal within each group, test undefined"
    return ""


def failure_test(k: int, n: int, k_ref: int, n_ref: int) -> dict[str, Any]:
    """Failure rates k/n and k_ref/n_ref, their difference and Fisher's exact p (two-sided);
    no p without a finished run on each side (`fisher_note` says so)."""
    rate = k / n if n else float("nan")
    rate_ref = k_ref / n_ref if n_ref else float("nan")
    p, note, need = float("nan"), "", sample_size.FISHER_GROUP
    if min(n, n_ref) < need:
        note = sample_size.too_small(f"{n} vs {n_ref} finished", f"≥{need} a group")
    else:
        p = float(stats.fisher_exact([[k, n - k], [k_ref, n_ref - k_ref]]).pvalue)
    return {"failures": k, "finished": n, "failures_ref": k_ref, "finished_ref": n_ref,
            "failure_rate_diff": rate - rate_ref, "fisher_p": p, "fisher_note": note}


def word(p: float, better: bool, note: str = "") -> str:
    """better / worse / no difference for one test at ALPHA; not tested when it has a note."""
    if note:
        return NOT_TESTED
    if pd.isna(p) or p >= ALPHA:
        return SAME
    return BETTER if better else WORSE


def verdict(words: dict[str, str]) -> str:
    """One word from the three dimensions' words, with the dimensions that decided it and
    those that could not be tested."""
    better = [d for d in DIMENSIONS if words.get(d) == BETTER]
    worse = [d for d in DIMENSIONS if words.get(d) == WORSE]
    untested = [d for d in DIMENSIONS if words.get(d) == NOT_TESTED]
    if len(untested) == len(DIMENSIONS):
        return NOTHING_TESTED
    detail = [f"not tested: {', '.join(untested)}"] if untested else []
    if better and worse:
        head, detail = MIXED, [f"better: {', '.join(better)}; worse: {', '.join(worse)}", *detail]
    elif better or worse:
        head, detail = (BETTER, [", ".join(better), *detail]) if better else (
            WORSE, [", ".join(worse), *detail])
    else:
        head = NO_DIFFERENCE
    return f"{head} ({'; '.join(detail)})" if detail else head


def compare(group: pd.DataFrame, reference: pd.DataFrame, pairs: pd.DataFrame,
            column: str = "test_best") -> dict[str, Any]:
    """The three comparisons of one configuration's runs with its `none` runs (`pairs`: the two
    side by side over their shared seeds, stats.pair_up), and the verdict."""
    mean = paired_test(pairs[column].to_numpy(), pairs[f"{column}_ref"].to_numpy())
    spread = spread_test(completed(group)[column].to_numpy(),
                         completed(reference)[column].to_numpy())
    done, done_ref = finished(group), finished(reference)
    fails = failure_test(int(is_failure(done).sum()), len(done),
                         int(is_failure(done_ref).sum()), len(done_ref))
    diff = (pairs[column] - pairs[f"{column}_ref"]).to_numpy()
    sd_diff = float(np.std(diff, ddof=1)) if len(diff) > 1 else float("nan")
    detectable = power.detectable(sd_diff, mean["n"], spread["n_std"], spread["n_std_ref"],
                                  fails["failures_ref"], fails["finished"], fails["finished_ref"])
    notes = {"ttest": mean["ttest_note"], "brown_forsythe": spread["brown_forsythe_note"],
             "fisher": fails["fisher_note"]}
    for test, columns in power.COLUMNS.items():  # no p, no power: the note says why
        if notes[test]:
            detectable |= dict.fromkeys(columns, float("nan"))
    words = {
        "mean": word(mean["ttest_p"], mean["mean_diff"] > 0, mean["ttest_note"]),
        "std": word(spread["brown_forsythe_p"], spread["std_ratio"] < 1,
                    spread["brown_forsythe_note"]),
        "failures": word(fails["fisher_p"], fails["failure_rate_diff"] < 0, fails["fisher_note"]),
    }
    return ({"n_pairs": mean["n"], "mean_diff": mean["mean_diff"], "ttest_p": mean["ttest_p"],
             "ttest_note": mean["ttest_note"]}
            | spread | fails | {f"{d}_word": w for d, w in words.items()}
            | {"verdict": verdict(words)} | detectable)


VERDICT_COLUMNS = [
    GROUP, "ref_config", "n_pairs", "mean_diff", "ttest_p", "ttest_note",
    "n_std", "n_std_ref", "std", "std_ref", "std_ratio", "brown_forsythe_p", "brown_forsythe_note",
    "failures", "finished", "failures_ref", "finished_ref", "failure_rate_diff", "fisher_p",
    "fisher_note",
    "mean_word", "std_word", "failures_word", "verdict", "reference_lr",
    *(column for columns in power.COLUMNS.values() for column in columns),
]  # fmt: skip


def verdicts(runs: pd.DataFrame, configs: Configs, column: str = "test_best") -> pd.DataFrame:
    """One row per comparison (each stabilizer configuration against its `none`), and one per
    configuration of another stabilizer that has no `none` to compare with, saying so."""
    runs = stat_columns(runs, column)
    groups = dict(list(runs.groupby(GROUP, sort=False)))
    compared = dict(comparisons(configs, runs))
    paired = pair_up(runs, compared, column)
    rows = []
    for config in configs.table.index:
        if config in compared:
            rows.append({GROUP: config, "ref_config": compared[config],
                         "reference_lr": configs.table.loc[config].get("reference_lr")}
                        | compare(groups[config], groups[compared[config]], paired[config],
                                  column))
        elif config in groups and configs.table.loc[config, "stabilizer"] != REFERENCE_STABILIZER:
            rows.append({GROUP: config, "ref_config": None,
                         "verdict": not_compared(configs.reference_lr)})
    table = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    # Counts stay integers where a row that was not compared leaves them blank.
    counts = ["n_pairs", "n_std", "n_std_ref", "failures", "finished", "failures_ref",
              "finished_ref"]
    table[counts] = table[counts].astype("Int64")
    return configs.describe(table)


def not_compared(reference_lr: float | None) -> str:
    """The verdict of a configuration with no `none` to compare with, and why."""
    why = f"{NOT_COMPARED}: no `{REFERENCE_STABILIZER}` run in an otherwise identical configuration"
    if reference_lr is None:
        return why + " (--reference-lr LR compares with `none` at LR)"
    return why + f", at its own lr or at --reference-lr {number(reference_lr)}"
