"""Statistics over the runs table: per-group summaries, expected max, paired tests, BLURB score.

Scores stay fractions (0-1) here; the tables multiply by 100 for display.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from blurbtune.report import sample_size
from blurbtune.report.constants import (
    ALPHA,
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
)
from blurbtune.report.identity import Configs

# One group = one configuration (report/identity.py), run over several seeds.
GROUP = "config"
# What the tables say about a configuration, in this order (report/identity.py adds the keys
# that tell apart two configurations of one model and task).
DESCRIBE = ["model", "task", "stabilizer", "knobs", "lr", "batch_size"]
# Two runs are paired when all their seeds agree.
PAIR_KEYS = ["seed", "data_seed", "init_seed"]
# Statuses that are a result: a diverged run is a finding of the study, not a missing run.
FINISHED = ("completed", "diverged")

# Model names whose published BLURB column is spelled differently, most likely first.
PUBLISHED_ALIASES = {
    "bert_base": ("bert_uncased",),
    "bert": ("bert_uncased",),
    "scibert": ("scibert_uncased",),
    "biolinkbert": ("biolinkbert_base",),
}


# The columns the per-configuration statistics read: a run table cut to them before it is
# split by configuration, so that each split and filter copies a dozen columns, not a hundred.
STAT_COLUMNS = [GROUP, *PAIR_KEYS, "status", "test_best", "test_last", "dev_best",
                "baseline_test", "collapsed_test", "task_type", "metric"]


def stat_columns(runs: pd.DataFrame, *more: str) -> pd.DataFrame:
    """`runs` with only STAT_COLUMNS (those it has) and `more`."""
    return runs[[c for c in dict.fromkeys([*STAT_COLUMNS, *more]) if c in runs.columns]]


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished."""
    return runs[runs["status"] == "completed"]


def is_degenerate(runs: pd.DataFrame) -> pd.Series:
    """Completed runs no better than the constant predictor on test, or with constant output."""
    worse = runs["test_best"] <= runs["baseline_test"]
    return (runs["status"] == "completed") & (worse | runs["collapsed_test"].astype(bool))


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are a result: completed or diverged."""
    return runs[runs["status"].isin(FINISHED)]


def is_failure(runs: pd.DataFrame) -> pd.Series:
    """Failed fine-tuning: diverged, or completed but degenerate (see is_degenerate)."""
    return (runs["status"] == "diverged") | is_degenerate(runs)


def seed_collisions(runs: pd.DataFrame) -> dict[str, list[tuple[dict, list[str]]]]:
    """Configurations holding two finished runs with the same seeds:
    {config: [({"seed": 0, "data_seed": 0, "init_seed": 0}, [folder, folder]), ...]}.

    Such a configuration is left out of every statistic until one of the runs is removed:
    averaging them would count one seed twice.
    """
    done = finished(runs)
    twice = done[done.duplicated([GROUP, *PAIR_KEYS], keep=False)]
    out: dict[str, list[tuple[dict, list[str]]]] = {}
    for (config, *seeds), group in twice.groupby([GROUP, *PAIR_KEYS], dropna=False, sort=True):
        folders = sorted(str(Path(p).parent) for p in group["path"])
        named = {key: _as_int(value) for key, value in zip(PAIR_KEYS, seeds, strict=True)}
        out.setdefault(config, []).append((named, folders))
    return out


def sample_std(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The sample standard deviation (ddof=1), vectorised for scipy.stats.bootstrap."""
    return np.std(values, ddof=1, axis=axis)


def bootstrap_ci(
    values: np.ndarray,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    statistic: Callable[..., Any] = np.mean,
    min_n: int | None = None,
) -> tuple[float, float]:
    """Seeded percentile bootstrap confidence interval of `statistic` (default the mean);
    NaNs below `min_n` values (default: what an interval of the mean needs, see
    `bootstrap_note`). NaN values are left out."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if bootstrap_note(len(values), statistic, confidence, min_n):
        return float("nan"), float("nan")
    kwargs: dict[str, Any] = dict(
        statistic=statistic,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method=BOOTSTRAP_METHOD,
    )
    try:
        result = stats.bootstrap((values,), rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 has no `rng`
        result = stats.bootstrap((values,), random_state=np.random.default_rng(seed), **kwargs)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_note(n: int, statistic: Callable[..., Any] = np.mean,
                   confidence: float = CONFIDENCE, min_n: int | None = None) -> str:
    """Why an interval of `statistic` over n values has no bounds ("" when it has them): the
    mean needs sample_size.bootstrap_mean_min values, the std bootstrap_std_min."""
    if min_n is None:
        min_n = (sample_size.bootstrap_std_min(confidence) if statistic is sample_std
                 else sample_size.bootstrap_mean_min(confidence))
    return sample_size.too_small(str(n), f"≥{min_n}") if n < min_n else ""


def _describe(values: pd.Series, prefix: str, full: bool = True) -> dict[str, float]:
    values = values.dropna()
    out = {f"{prefix}_mean": values.mean(), f"{prefix}_std": values.std(ddof=1)}
    if full:
        out |= {
            f"{prefix}_median": values.median(),
            f"{prefix}_min": values.min(),
            f"{prefix}_max": values.max(),
        }
    return out


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (no continuity correction); NaNs when n = 0.

    Unlike the Wald interval it is neither empty nor zero-width at k = 0 or k = n, so it needs
    no more than one observation (sample_size.WILSON_N).
    """
    if n < sample_size.WILSON_N:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence,
                                                       method="wilson")
    return float(ci.low), float(ci.high)


def summarize_group(group: pd.DataFrame) -> dict[str, Any]:
    """Counts and score statistics of one configuration's runs; scores from completed runs only.

    Failures (diverged, or degenerate) are counted over the finished runs (completed or
    diverged), with a Wilson interval. The std and its bootstrap interval are over the completed
    runs' test scores, degenerate ones included: a diverged run has no test score.
    """
    done = completed(group)
    status = group["status"]
    low, high = bootstrap_ci(done["test_best"].to_numpy())
    std_low, std_high = bootstrap_ci(done["test_best"].to_numpy(), statistic=sample_std)
    n_finished, failures = len(finished(group)), int(is_failure(group).sum())
    fail_low, fail_high = wilson_interval(failures, n_finished)
    n = int(done["test_best"].notna().sum())
    return {
        "task_type": group["task_type"].iloc[0] if len(group) else None,
        "metric": group["metric"].iloc[0] if len(group) else None,
        "runs": len(group),
        "completed": len(done),
        "failed": int((~status.isin(["completed", "running"])).sum()),
        "running": int((status == "running").sum()),
        "n": n,
        **_describe(done["test_best"], "test_best"),
        "test_best_ci_low": low,
        "test_best_ci_high": high,
        "test_best_ci_note": bootstrap_note(n),
        "test_best_std_ci_low": std_low,
        "test_best_std_ci_high": std_high,
        "test_best_std_ci_note": bootstrap_note(n, sample_std),
        **_describe(done["test_last"], "test_last"),
        **_describe(done["dev_best"], "dev_best", full=False),
        "degenerate": int(is_degenerate(group).sum()),
        "diverged": int((status == "diverged").sum()),
        "finished": n_finished,
        "failures": failures,
        "failure_rate": failures / n_finished if n_finished else float("nan"),
        "failure_ci_low": fail_low,
        "failure_ci_high": fail_high,
        "failure_ci_note": "" if n_finished >= sample_size.WILSON_N
        else sample_size.too_small(f"{n_finished} finished", f"≥{sample_size.WILSON_N}"),
    }


def summarize(runs: pd.DataFrame, configs: Configs) -> pd.DataFrame:
    """One row per configuration with run counts and score statistics, in the configs' order."""
    runs = stat_columns(runs)
    groups = dict(list(runs.groupby(GROUP, sort=False)))
    rows = [{GROUP: c} | summarize_group(groups[c]) for c in configs.table.index if c in groups]
    if not rows:  # every configuration left out: the columns still say what there would be
        empty = summarize_group(runs.iloc[:0])
        return pd.DataFrame(columns=[GROUP, *DESCRIBE, *configs.varying, *empty, "model_id"])
    summary = configs.describe(pd.DataFrame(rows))
    summary["model_id"] = configs.table.loc[summary[GROUP], "model_id"].to_numpy()
    return summary


def expected_max(values: np.ndarray, k_max: int | None = None) -> np.ndarray:
    """Expected maximum of k draws (with replacement) from `values`, for k = 1..k_max (default n).

    Dodge et al. 2019: with v(1) <= ... <= v(n) sorted,
    E[max of k] = sum_i v(i) * ((i/n)^k - ((i-1)/n)^k).

    >>> expected_max([0.2, 0.4]).round(3).tolist()
    [0.3, 0.35]
    """
    return _max_weights(values, k_max) @ _sorted(values)


def expected_max_std(values: np.ndarray, k_max: int | None = None) -> np.ndarray:
    """Standard deviation of the maximum of k draws, for k = 1..k_max (default n)."""
    v = _sorted(values)
    weights = _max_weights(values, k_max)
    mean = weights @ v
    return np.sqrt(np.clip(weights @ v**2 - mean**2, 0.0, None))


def _sorted(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return np.sort(v[~np.isnan(v)])


def _max_weights(values: np.ndarray, k_max: int | None) -> np.ndarray:
    """P(max of k draws is the i-th smallest value), shape (k_max, n)."""
    n = len(_sorted(values))
    k = np.arange(1, (n if k_max is None else k_max) + 1)[:, None]
    i = np.arange(1, n + 1)[None, :]
    return (i / n) ** k - ((i - 1) / n) ** k


def expected_max_table(runs: pd.DataFrame, configs: Configs, column: str = "dev_best"
                       ) -> pd.DataFrame:
    """Expected max of `column` over k = 1..n completed runs, per configuration."""
    rows = []
    groups = dict(list(completed(runs).groupby(GROUP, sort=False)))
    for config in configs.table.index:
        if config not in groups:
            continue
        values = groups[config][column].dropna().to_numpy()
        means, stds = expected_max(values), expected_max_std(values)
        for k, (mean, std) in enumerate(zip(means, stds, strict=True), start=1):
            rows.append({GROUP: config, "n": len(values), "k": k, "expected_max": mean,
                         "std": std})
    frame = pd.DataFrame(rows, columns=[GROUP, "n", "k", "expected_max", "std"])
    return configs.describe(frame)


def paired_test(treated: np.ndarray, reference: np.ndarray, alpha: float = ALPHA
                ) -> dict[str, Any]:
    """Compare paired scores: mean difference, wins/ties/losses, Wilcoxon and paired t-test p.

    A pair with a NaN on either side is left out. Below a test's minimum (a t-test needs
    2 pairs whose differences are not all equal, the Wilcoxon test enough non-zero
    differences to reach p < alpha: sample_size.wilcoxon_min) its p is NaN and its note says
    why.
    """
    treated, reference = np.asarray(treated, float), np.asarray(reference, float)
    keep = ~(np.isnan(treated) | np.isnan(reference))
    treated, reference = treated[keep], reference[keep]
    diff = treated - reference
    n = len(diff)
    tie = np.abs(diff) <= sample_size.EQUAL
    out: dict[str, Any] = {
        "n": n,
        "mean_diff": float(diff.mean()) if n else float("nan"),
        "wins": int((diff > 0)[~tie].sum()),
        "ties": int(tie.sum()),
        "losses": int((diff < 0)[~tie].sum()),
        "wilcoxon_p": float("nan"),
        "wilcoxon_note": "",
        "ttest_p": float("nan"),
        "ttest_note": "",
    }
    nonzero, need = int((~tie).sum()), sample_size.wilcoxon_min(alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if nonzero < need:
            out["wilcoxon_note"] = sample_size.too_small(
                sample_size.plural(nonzero, "non-zero difference"), f"≥{need}")
        else:  # differences within rounding of each other are one value, of one rank
            rounded = np.where(tie, 0.0, np.round(diff, 12))
            out["wilcoxon_p"] = float(stats.wilcoxon(rounded).pvalue)
        if n < sample_size.TTEST_PAIRS:
            out["ttest_note"] = sample_size.too_small(sample_size.plural(n, "pair"),
                                                      f"≥{sample_size.TTEST_PAIRS}")
        elif np.ptp(diff) <= sample_size.EQUAL:
            out["ttest_note"] = f"all {n} differences equal, t undefined"
        else:
            out["ttest_p"] = float(stats.ttest_rel(treated, reference).pvalue)
    return out


def comparisons(configs: Configs, runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(stabilizer config, its `none` config) for each configuration that has one in `runs`."""
    present = set(runs[GROUP])
    table = configs.table
    return [(config, ref) for config, ref in table["reference"].items()
            if ref is not None and pd.notna(ref) and config in present and ref in present]


def pair_up(runs: pd.DataFrame, compared: dict[str, str], column: str
            ) -> dict[str, pd.DataFrame]:
    """Per configuration in `compared` (config -> its reference config): its completed runs and
    its reference's side by side over their shared seeds (the seeds, `column` and
    `<column>_ref`, in seed order). One merge for every comparison of the sweep."""
    done = completed(runs)[[GROUP, *PAIR_KEYS, column]].dropna(subset=[column])
    treated = done[done[GROUP].isin(compared)]
    treated = treated.assign(_ref=treated[GROUP].map(compared))
    reference = done.rename(columns={GROUP: "_ref", column: f"{column}_ref"})
    pairs = pd.merge(treated, reference, on=["_ref", *PAIR_KEYS]).sort_values(
        [GROUP, *PAIR_KEYS])
    groups = dict(list(pairs.drop(columns="_ref").groupby(GROUP, sort=False)))
    empty = pairs.iloc[:0].drop(columns="_ref")
    return {config: groups.get(config, empty).drop(columns=GROUP) for config in compared}


def paired_comparisons(runs: pd.DataFrame, configs: Configs, column: str = "test_best"
                       ) -> pd.DataFrame:
    """Each stabilizer configuration against `none` on the seeds both completed.

    The reference is the `none` configuration that is otherwise identical (same model and data
    by content, same lr, batch size, epochs and every other setting); a configuration without
    one is not compared.
    """
    rows = []
    compared = dict(comparisons(configs, runs))
    paired = pair_up(runs, compared, column)
    for config, ref in compared.items():
        pairs = paired[config]
        result = paired_test(pairs[column].to_numpy(), pairs[f"{column}_ref"].to_numpy())
        rows.append({GROUP: config, "ref_config": ref} | result
                    | {"seeds": " ".join(str(_as_int(s)) for s in pairs["seed"])})
    columns = [GROUP, "ref_config", "n", "mean_diff", "wins", "ties", "losses", "wilcoxon_p",
               "wilcoxon_note", "ttest_p", "ttest_note", "seeds"]
    return configs.describe(pd.DataFrame(rows, columns=columns))


def _as_int(value: Any) -> Any:
    return int(value) if pd.notna(value) and float(value).is_integer() else value


def published_column(model: str, columns: list[str]) -> str | None:
    """The published-score column for a model name, if there is one."""
    for name in (model, *PUBLISHED_ALIASES.get(model, ())):
        if name in columns:
            return name
    return None


def _blurb() -> tuple[Callable[[dict[str, float]], float], pd.DataFrame] | None:
    """The BLURB score function and published scores (0-100), or None without blurbtune.blurb."""
    try:
        from blurbtune.blurb import published_scores
        from blurbtune.blurb import score as blurb_score
    except ImportError:
        return None
    return blurb_score, published_scores()


def published_reference(summary: pd.DataFrame) -> pd.Series | None:
    """Published test score (a fraction) per summary row; None without blurbtune.blurb."""
    blurb = _blurb()
    if blurb is None:
        return None
    published = blurb[1]

    def lookup(row: pd.Series) -> float:
        column = published_column(str(row["model"]), list(published.columns))
        if column is None or row["task"] not in published.index:
            return float("nan")
        return float(published.loc[row["task"], column]) / 100.0

    if summary.empty:
        return pd.Series(dtype=float)
    return summary.apply(lookup, axis=1)


def blurb_table(summary: pd.DataFrame) -> pd.DataFrame | None:
    """Per (model, stabilizer, knobs): each BLURB task's mean test score and the BLURB score.

    A model is its weights (model_id), so two models of one name are two blocks. Where a task
    was run in several configurations (lr, batch size, epochs...), the one with the best mean
    dev score is used (hyperparameters chosen on dev, as BLURB does). The last row of each block
    has task "BLURB"; its score is NaN unless all BLURB tasks are present. Scores are fractions.
    Returns None when blurbtune.blurb is not available, an empty frame when no task is in BLURB.
    """
    blurb = _blurb()
    if blurb is None:
        return None
    blurb_score, published = blurb
    tasks = [task for task in published.index if str(task).lower() != "blurb"]
    covered = summary[summary["task"].isin(tasks)].copy()
    covered["_dev"] = covered["dev_best_mean"].fillna(-np.inf)
    rows = []
    for (model, _, stabilizer, knobs), block in covered.groupby(
        ["model", "model_id", "stabilizer", "knobs"], dropna=False, sort=True
    ):
        column = published_column(str(model), list(published.columns))
        best = block.sort_values("_dev", ascending=False).drop_duplicates("task")
        best = best.set_index("task").reindex([t for t in tasks if t in set(best["task"])])
        head = {"model": model, "stabilizer": stabilizer, "knobs": knobs}
        for task, row in best.iterrows():
            ref = published.loc[task, column] / 100.0 if column else float("nan")
            rows.append(
                head
                | {"task": task, "lr": row["lr"], "batch_size": row["batch_size"], "n": row["n"]}
                | {"test_mean": row["test_best_mean"], "published": ref, "note": ""}
            )
        measured = best["test_best_mean"].dropna().to_dict()
        score = _try_score(blurb_score, measured)
        ref_score = float("nan")
        if column:
            ref_score = _try_score(blurb_score, (published.loc[tasks, column] / 100.0).to_dict())
        note = f"{len(measured)}/{len(tasks)} tasks"
        if np.isnan(score):
            note += "; the BLURB score needs all of them"
        rows.append(
            head
            | {"task": "BLURB", "lr": np.nan, "batch_size": np.nan, "n": np.nan}
            | {"test_mean": score, "published": ref_score, "note": note}
        )
    columns = [
        "model", "stabilizer", "knobs", "task", "lr", "batch_size", "n",
        "test_mean", "published", "note",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _try_score(blurb_score: Callable[[dict[str, float]], float], scores: dict) -> float:
    try:
        return float(blurb_score(scores))
    except (ValueError, KeyError):
        return float("nan")
