"""Statistics over the runs table: per-group summaries, expected max, paired tests, BLURB score.

Scores stay fractions (0-1) here; the tables multiply by 100 for display.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

# One group = one configuration, run over several seeds.
GROUP_KEYS = ["model", "task", "stabilizer", "knobs", "lr", "batch_size"]
# Two runs are paired when all their seeds agree.
PAIR_KEYS = ["seed", "data_seed", "init_seed"]
REFERENCE_STABILIZER = "none"

CONFIDENCE = 0.95
BOOTSTRAP_METHOD = "percentile"
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0

# Model names whose published BLURB column is spelled differently, most likely first.
PUBLISHED_ALIASES = {
    "bert_base": ("bert_uncased",),
    "bert": ("bert_uncased",),
    "scibert": ("scibert_uncased",),
    "biolinkbert": ("biolinkbert_base",),
}


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished."""
    return runs[runs["status"] == "completed"]


def is_degenerate(runs: pd.DataFrame) -> pd.Series:
    """Completed runs no better than the constant predictor on test, or with constant output."""
    worse = runs["test_best"] <= runs["baseline_test"]
    return (runs["status"] == "completed") & (worse | runs["collapsed_test"].astype(bool))


def bootstrap_ci(
    values: np.ndarray,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean; NaNs when there are < 2 values."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    kwargs: dict[str, Any] = dict(
        statistic=np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method=BOOTSTRAP_METHOD,
    )
    try:
        result = stats.bootstrap((values,), rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 has no `rng`
        result = stats.bootstrap((values,), random_state=np.random.default_rng(seed), **kwargs)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


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


def summarize_group(group: pd.DataFrame) -> dict[str, Any]:
    """Counts and score statistics of one configuration's runs; scores from completed runs only."""
    done = completed(group)
    status = group["status"]
    low, high = bootstrap_ci(done["test_best"].to_numpy())
    return {
        "task_type": group["task_type"].iloc[0],
        "metric": group["metric"].iloc[0],
        "runs": len(group),
        "completed": len(done),
        "failed": int((~status.isin(["completed", "running"])).sum()),
        "running": int((status == "running").sum()),
        "n": int(done["test_best"].notna().sum()),
        **_describe(done["test_best"], "test_best"),
        "test_best_ci_low": low,
        "test_best_ci_high": high,
        **_describe(done["test_last"], "test_last"),
        **_describe(done["dev_best"], "dev_best", full=False),
        "degenerate": int(is_degenerate(group).sum()),
    }


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (GROUP_KEYS) with run counts and score statistics."""
    rows = []
    for key, group in runs.groupby(GROUP_KEYS, dropna=False, sort=True):
        rows.append(dict(zip(GROUP_KEYS, key, strict=True)) | summarize_group(group))
    if not rows:
        return pd.DataFrame(columns=GROUP_KEYS)
    summary = pd.DataFrame(rows)
    reference_last = summary["stabilizer"] != REFERENCE_STABILIZER  # `none` first in each task
    order = summary.assign(_ref=reference_last).sort_values(
        ["model", "task", "_ref", "stabilizer", "knobs", "lr", "batch_size"], kind="stable"
    )
    return order.drop(columns="_ref").reset_index(drop=True)


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


def expected_max_table(runs: pd.DataFrame, column: str = "dev_best") -> pd.DataFrame:
    """Expected max of `column` over k = 1..n completed runs, per configuration."""
    rows = []
    for key, group in completed(runs).groupby(GROUP_KEYS, dropna=False, sort=True):
        values = group[column].dropna().to_numpy()
        means, stds = expected_max(values), expected_max_std(values)
        for k, (mean, std) in enumerate(zip(means, stds, strict=True), start=1):
            row = dict(zip(GROUP_KEYS, key, strict=True))
            rows.append(row | {"n": len(values), "k": k, "expected_max": mean, "std": std})
    columns = [*GROUP_KEYS, "n", "k", "expected_max", "std"]
    return pd.DataFrame(rows, columns=columns)


def paired_test(treated: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Compare paired scores: mean difference, wins/ties/losses, Wilcoxon and paired t-test p."""
    treated, reference = np.asarray(treated, float), np.asarray(reference, float)
    diff = treated - reference
    n = len(diff)
    tie = np.isclose(diff, 0.0, rtol=0.0, atol=1e-12)
    out: dict[str, Any] = {
        "n": n,
        "mean_diff": float(diff.mean()) if n else float("nan"),
        "wins": int((diff > 0)[~tie].sum()),
        "ties": int(tie.sum()),
        "losses": int((diff < 0)[~tie].sum()),
        "wilcoxon_p": float("nan"),
        "ttest_p": float("nan"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if (~tie).sum() >= 1 and n >= 2:
            out["wilcoxon_p"] = float(stats.wilcoxon(treated, reference).pvalue)
        if n >= 2 and np.std(diff) > 0:
            out["ttest_p"] = float(stats.ttest_rel(treated, reference).pvalue)
    return out


def _reference_group(
    done: pd.DataFrame, model: Any, task: Any, lr: Any, batch_size: Any
) -> pd.DataFrame | None:
    """The `none` runs to compare with: same model and task, same lr and batch size if swept."""
    same = done[
        (done["model"] == model)
        & (done["task"] == task)
        & (done["stabilizer"] == REFERENCE_STABILIZER)
    ]
    configs = same.groupby(["knobs", "lr", "batch_size"], dropna=False)
    if configs.ngroups == 1:
        return same
    exact = same[_equal(same["lr"], lr) & _equal(same["batch_size"], batch_size)]
    if exact.groupby(["knobs", "lr", "batch_size"], dropna=False).ngroups == 1:
        return exact
    return None


def _equal(column: pd.Series, value: Any) -> pd.Series:
    return column.isna() if pd.isna(value) else column == value


def paired_comparisons(runs: pd.DataFrame, column: str = "test_best") -> pd.DataFrame:
    """Each stabilizer configuration against `none` on the seeds both completed, per model/task.

    The reference is the `none` configuration of the same model and task; when several exist
    (an lr or batch-size sweep), the one with the same lr and batch size.
    """
    done = completed(runs).dropna(subset=[column])
    rows = []
    for key, group in done.groupby(GROUP_KEYS, dropna=False, sort=True):
        config = dict(zip(GROUP_KEYS, key, strict=True))
        if config["stabilizer"] == REFERENCE_STABILIZER:
            continue
        reference = _reference_group(
            done, config["model"], config["task"], config["lr"], config["batch_size"]
        )
        if reference is None or reference.empty:
            continue
        pairs = pd.merge(
            group.drop_duplicates(PAIR_KEYS, keep="last"),
            reference.drop_duplicates(PAIR_KEYS, keep="last"),
            on=PAIR_KEYS,
            suffixes=("", "_ref"),
        ).sort_values(PAIR_KEYS)
        result = paired_test(pairs[column].to_numpy(), pairs[f"{column}_ref"].to_numpy())
        rows.append(
            config
            | {"ref_lr": reference["lr"].iloc[0], "ref_batch_size": reference["batch_size"].iloc[0]}
            | result
            | {"seeds": " ".join(str(_as_int(s)) for s in pairs["seed"])}
        )
    columns = [
        *GROUP_KEYS, "ref_lr", "ref_batch_size",
        "n", "mean_diff", "wins", "ties", "losses", "wilcoxon_p", "ttest_p", "seeds",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


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

    Where a task was run with several lr / batch sizes, the one with the best mean dev score is
    used (hyperparameters chosen on dev, as BLURB does). The last row of each block has task
    "BLURB"; its score is NaN unless all BLURB tasks are present. Scores are fractions.
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
    for (model, stabilizer, knobs), block in covered.groupby(
        ["model", "stabilizer", "knobs"], dropna=False, sort=True
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
