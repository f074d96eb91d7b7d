"""Find the runs' results.json files under sweep folders and load them into one table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from blurbtune.report.identity import (
    VERSIONS,
    Configs,
    build_configs,
    config_id,
    knobs_label,
    read_provenance,
    run_identity,
    versions,
)

RESULTS_FILE = "results.json"
REQUIRED_KEYS = ("status", "task", "model")
SPLITS = ("dev", "test")

# Columns every runs table has, in this order; `knob.*` columns follow.
COLUMNS = [
    "path", "config", "status", "error",
    "task", "task_type", "dataset", "metric",
    "model", "model_name_or_path",
    "stabilizer", "knobs",
    "lr", "batch_size", "max_epochs",
    "seed", "data_seed", "init_seed",
    "dev_best", "dev_last", "test_best", "test_last", "best_epoch",
    "baseline_dev", "baseline_test", "collapsed_dev", "collapsed_test",
    "n_train", "n_dev", "n_test",
    "train_time_s", "clip_fraction", "run_dir", "overrides", "left_out",
    *(f"version.{name}" for name in VERSIONS),
]  # fmt: skip
# Per-run series kept in the runs table for the plots, not written to runs.csv.
SERIES = ["history", "grad_norm_early"]


@dataclass
class Collection:
    """The runs found under some folders: one row per run, plus the files that could not be read."""

    runs: pd.DataFrame
    configs: Configs
    errors: list[tuple[Path, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def find_results(root: Path) -> list[Path]:
    """Every results.json under `root` (at any depth), sorted."""
    root = Path(root)
    if root.is_file():
        return [root] if root.name == RESULTS_FILE else []
    return sorted(root.rglob(RESULTS_FILE))


def load_result(path: Path) -> dict[str, Any]:
    """Read one results.json; raise ValueError saying why it is unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if data.get(key) is None]
    if missing:
        raise ValueError(f"missing keys: {', '.join(missing)}")
    for key in (*SPLITS, "baseline", "collapsed", "n_examples", "stabilizer_knobs"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"'{key}' should be an object, got {type(data[key]).__name__}")
    return data


def flatten(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """One runs-table row from a parsed results.json."""
    scores = {split: data.get(split) or {} for split in SPLITS}
    baseline = data.get("baseline") or {}
    collapsed = data.get("collapsed") or {}
    n_examples = data.get("n_examples") or {}
    knobs = data.get("stabilizer_knobs") or {}
    overrides = data.get("overrides")
    row = {
        "path": str(path),
        "status": data["status"],
        "error": data.get("error"),
        "task": data["task"],
        "task_type": data.get("task_type"),
        "dataset": data.get("dataset"),
        "metric": data.get("metric"),
        "model": data["model"],
        "model_name_or_path": data.get("model_name_or_path"),
        "stabilizer": data.get("stabilizer") or "none",
        "knobs": knobs_label(knobs),
        "lr": data.get("lr"),
        "batch_size": data.get("batch_size"),
        "max_epochs": data.get("max_epochs"),
        "seed": data.get("seed"),
        "data_seed": data.get("data_seed"),
        "init_seed": data.get("init_seed"),
        "best_epoch": data.get("best_epoch"),
        "train_time_s": data.get("train_time_s"),
        "run_dir": data.get("run_dir"),
        "overrides": " ".join(overrides) if isinstance(overrides, list) else overrides,
    }
    for split in SPLITS:
        for which in ("best", "last"):
            row[f"{split}_{which}"] = scores[split].get(which)
        row[f"baseline_{split}"] = baseline.get(split)
        row[f"collapsed_{split}"] = collapsed.get(split)
    for split in ("train", "dev", "test"):
        row[f"n_{split}"] = n_examples.get(split)
    for key, value in knobs.items():
        row[f"knob.{key}"] = value
    row |= diagnostics(data)
    row["left_out"] = unusable_scores(data)
    return row


def unusable_scores(data: dict[str, Any]) -> str:
    """Why a completed run has no score every statistic can use ("" when it has them): a
    missing `dev` or `test`, or a `best` that is absent or not a finite number."""
    if data["status"] != "completed":
        return ""
    reasons = []
    for split in SPLITS:
        scores = data.get(split)
        best = scores.get("best") if isinstance(scores, dict) else None
        if scores is None:
            reasons.append(f"no `{split}` scores")
        elif not isinstance(best, int | float) or isinstance(best, bool):
            reasons.append(f"no `{split}.best` score")
        elif not math.isfinite(best):
            reasons.append(f"`{split}.best` is {best}")
    return "; ".join(reasons)


def diagnostics(data: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch history, early gradient norms per part and the clipped fraction, where recorded.

    Older runs lack some or all of them (None); a malformed entry is treated as absent.
    """
    history = data.get("history")
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        history = None
    diag = data.get("diagnostics") if isinstance(data.get("diagnostics"), dict) else {}
    grad = diag.get("grad_norm") if isinstance(diag.get("grad_norm"), dict) else {}
    early = grad.get("early") if isinstance(grad.get("early"), dict) else None
    clip = diag.get("clip_fraction")
    return {
        "history": history or None,
        "grad_norm_early": early or None,
        "clip_fraction": clip if isinstance(clip, int | float) else None,
    }


def collect(paths: Iterable[Path], reference_lr: float | None = None) -> Collection:
    """Load every results.json under `paths`; unreadable ones go to `errors`, not up the stack.
    `reference_lr`: see `identity.build_configs`."""
    files: list[Path] = []
    seen: set[Path] = set()
    for root in paths:
        for file in find_results(Path(root)):
            if file.resolve() not in seen:
                seen.add(file.resolve())
                files.append(file)
    rows, errors, identities = [], [], {}
    for file in files:
        try:
            data = load_result(file)
            provenance = read_provenance(file.parent)
            identity = run_identity(file.parent, data, provenance)
        except ValueError as exc:
            errors.append((file, str(exc)))
            continue
        config = config_id(identity)
        identities[config] = identity
        rows.append(flatten(data, file) | {"config": config} | {
            f"version.{name}": value for name, value in versions(provenance).items()})
    runs = runs_frame(rows)
    return Collection(runs=runs, configs=build_configs(runs, identities, reference_lr),
                      errors=errors, files=files)


def runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The runs table with typed score columns, fixed columns first, `knob.*` columns last."""
    frame = pd.DataFrame(rows)
    knob_columns = sorted(c for c in frame.columns if c.startswith("knob."))
    frame = frame.reindex(columns=COLUMNS + knob_columns + SERIES)
    numeric = [
        "lr", "batch_size", "max_epochs", "seed", "data_seed", "init_seed",
        "dev_best", "dev_last", "test_best", "test_last", "best_epoch",
        "baseline_dev", "baseline_test", "n_train", "n_dev", "n_test", "train_time_s",
        "clip_fraction",
    ]  # fmt: skip
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("collapsed_dev", "collapsed_test"):
        frame[column] = frame[column].map(lambda v: v is True).astype(bool)
    frame["knobs"] = frame["knobs"].fillna("")
    frame["left_out"] = frame["left_out"].fillna("")
    return frame.sort_values(["model", "task", "stabilizer", "knobs", "seed"], kind="stable")


def write_runs(runs: pd.DataFrame, out_dir: Path) -> Path:
    """Write the runs table to `out_dir/runs.csv`."""
    out = Path(out_dir) / "runs.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=[c for c in SERIES if c in runs]).to_csv(out, index=False)
    return out
