"""What a reader of the report must be told: seed collisions, missing seeds, unfinished and
degenerate runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from blurbtune.report.constants import number
from blurbtune.report.identity import Configs
from blurbtune.report.stats import GROUP, PAIR_KEYS, completed, is_degenerate


def _seeds(values: pd.Series) -> str:
    return ", ".join(number(v) for v in sorted(values.dropna().unique()))


def collisions(found: dict[str, list[tuple[dict, list[str]]]], configs: Configs) -> list[str]:
    """One line per configuration left out because two of its finished runs share their seeds."""
    messages = []
    for config, groups in found.items():
        where = "; ".join(
            ", ".join(f"{key} {number(value)}" for key, value in seeds.items())
            + " in " + " and ".join(folders)
            for seeds, folders in groups)
        messages.append(f"{configs.label(config)}: {where}")
    return messages


def missing_seeds(runs: pd.DataFrame, configs: Configs) -> list[str]:
    """Configurations with fewer completed seeds than the largest one, and which seeds they lack."""
    done = completed(runs).drop_duplicates([GROUP, *PAIR_KEYS])
    counts = done.groupby(GROUP, sort=False).size()
    present = set(runs[GROUP])
    groups = [(config, int(counts.get(config, 0))) for config in configs.table.index
              if config in present]
    largest = max((n for _, n in groups), default=0)
    all_seeds = set(done["seed"].dropna())
    seeds = done.groupby(GROUP, sort=False)["seed"].agg(lambda s: set(s.dropna()))
    messages = []
    for config, n in groups:
        if n >= largest:
            continue
        message = f"{configs.label(config)}: {n} of {largest} seeds completed"
        lacking = pd.Series(sorted(all_seeds - seeds.get(config, set())), dtype=float)
        if len(lacking):
            message += f"; missing seed {_seeds(lacking)}"
        messages.append(message)
    return messages


def unfinished(runs: pd.DataFrame, configs: Configs) -> tuple[list[str], list[str]]:
    """(failed or diverged runs with their errors, runs still running)."""
    failed, running = [], []
    for _, run in runs[runs["status"] != "completed"].iterrows():
        where = f"{configs.label(run[GROUP])} seed {number(run['seed'])}"
        if run["status"] == "running":
            running.append(f"{where} ({Path(run['path']).parent})")
        else:
            error = run["error"] if pd.notna(run["error"]) and run["error"] else "no error message"
            failed.append(f"{where}: {run['status']}: {error} ({Path(run['path']).parent})")
    return failed, running


def degenerate(runs: pd.DataFrame, configs: Configs) -> list[str]:
    """Completed runs no better than the constant predictor on test, or with constant output."""
    messages = []
    for _, run in runs[is_degenerate(runs)].iterrows():
        reasons = []
        if run["test_best"] <= run["baseline_test"]:
            reasons.append(
                f"test {100 * run['test_best']:.2f} <= constant predictor "
                f"{100 * run['baseline_test']:.2f}"
            )
        if run["collapsed_test"]:
            reasons.append("test predictions (nearly) constant")
        where = f"{configs.label(run[GROUP])} seed {number(run['seed'])}"
        messages.append(f"{where}: {'; '.join(reasons)} ({Path(run['path']).parent})")
    return messages


def mixed_versions(runs: pd.DataFrame, configs: pd.Series) -> list[str]:
    """Per configuration (in `configs`' order): which versions its runs mix, e.g.
    "torch 2.12.0 (4 runs), 2.13.0 (6 runs)", or "". A run that does not record one (older
    runs) is unknown, not a difference."""
    columns = [c for c in runs.columns if c.startswith("version.")]
    parts: dict[str, list[str]] = {}
    for column in columns:  # one count per (configuration, version), NaN left out
        counts = runs.groupby([GROUP, column]).size()
        values = counts.groupby(level=0).size()
        for config in values.index[values > 1]:
            parts.setdefault(config, []).append(
                f"{column.removeprefix('version.')} " + ", ".join(
                    f"{value} ({count} runs)" for value, count in counts[config].items()))
    return ["mixed: " + "; ".join(parts[c]) if c in parts else "" for c in configs]


def no_reference_at(verdicts: pd.DataFrame, reference_lr: float) -> list[str]:
    """A note when `--reference-lr` found no `none` run for some configuration."""
    missing = verdicts["ref_config"].isna().sum() if len(verdicts) else 0
    if not missing:
        return []
    return [f"--reference-lr {number(reference_lr)}: {missing} configuration(s) have no `none` "
            "run at their own lr nor at this one; their verdict rows say so."]
