"""Per-task figures: test scores over seeds, and the expected-max dev curve, per stabilizer.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module
never changes the user's backend.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from blurbtune.report.stats import GROUP_KEYS, REFERENCE_STABILIZER, completed, is_degenerate
from blurbtune.report.tables import number

PLOT_DIR = "plots"


def slug(text: str) -> str:
    """A file-name-safe form of a task or model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def varying(frame: pd.DataFrame) -> set[str]:
    """Which of lr / batch_size take more than one value in `frame`."""
    return {key for key in ("lr", "batch_size") if frame[key].nunique(dropna=False) > 1}


def config_label(config: tuple, varies: set[str]) -> str:
    """A short label: the stabilizer, plus knobs, and lr / bs where they vary."""
    stabilizer, knobs, lr, batch_size = config
    parts = [stabilizer] + (knobs.split(", ") if knobs else [])
    if "lr" in varies:
        parts.append(f"lr={number(lr)}")
    if "batch_size" in varies:
        parts.append(f"bs={number(batch_size)}")
    return "\n".join(parts)


def _configs(frame: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """The frame split by configuration, `none` first."""
    groups = list(frame.groupby(GROUP_KEYS[2:], dropna=False, sort=True))
    return sorted(groups, key=lambda item: item[0][0] != REFERENCE_STABILIZER)


def _title(what: str, task: str, model: str, seeds: list[int]) -> str:
    low, high = min(seeds, default=0), max(seeds, default=0)
    n = str(low) if low == high else f"{low}-{high}"
    return f"{task} - {model}: {what} (n = {n} seeds)"


def plot_scores(runs: pd.DataFrame, out_dir: Path, column: str = "test_best") -> list[Path]:
    """One PNG per (model, task): a box per configuration with each seed's score as a point.

    Degenerate runs are drawn as red crosses; the constant predictor's score is a dashed line.
    """
    paths = []
    done = completed(runs).dropna(subset=[column]).copy()
    done["degenerate"] = is_degenerate(done)
    for (model, task), frame in done.groupby(["model", "task"], sort=True):
        varies, groups = varying(frame), _configs(frame)
        fig = _figure((max(5.5, 1.6 + 1.6 * len(groups)), 4.2))
        ax = fig.subplots()
        ax.boxplot(
            [100 * g[column].to_numpy() for _, g in groups],
            showfliers=False,
            widths=0.5,
        )
        rng = np.random.default_rng(0)
        labelled = False
        for position, (_, group) in enumerate(groups, start=1):
            jitter = position + rng.uniform(-0.12, 0.12, len(group))
            bad = group["degenerate"].to_numpy()
            scores = 100 * group[column].to_numpy()
            ax.scatter(jitter[~bad], scores[~bad], s=18, color="tab:blue", alpha=0.8, zorder=3)
            ax.scatter(jitter[bad], scores[bad], s=30, color="tab:red", marker="x", zorder=3,
                       label="degenerate run" if bad.any() and not labelled else None)  # fmt: skip
            labelled = labelled or bool(bad.any())
        baseline = frame["baseline_test"].dropna()
        low, high = ax.get_ylim()
        if len(baseline) and low <= 100 * baseline.max() <= high:  # not when far below the data
            ax.axhline(100 * baseline.max(), color="grey", linestyle="--", linewidth=1,
                       label="constant predictor")  # fmt: skip
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.set_xticks(range(1, len(groups) + 1), [config_label(k, varies) for k, _ in groups])
        metric = frame["metric"].dropna()
        ax.set_ylabel(f"test {metric.iloc[0] if len(metric) else 'score'} (x100)")
        ax.set_title(_title("test score over seeds", task, model, [len(g) for _, g in groups]))
        fig.tight_layout()
        paths.append(_save(fig, out_dir, f"scores_{slug(task)}_{slug(model)}.png"))
    return paths


def plot_expected_max(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per (model, task): expected max dev score over k runs (± its std), per config."""
    paths = []
    for (model, task), frame in table.groupby(["model", "task"], sort=True):
        varies = varying(frame)
        fig = _figure((6, 4.2))
        ax = fig.subplots()
        seeds = []
        for key, curve in _configs(frame):
            k = curve["k"].to_numpy()
            mean, std = 100 * curve["expected_max"].to_numpy(), 100 * curve["std"].to_numpy()
            (line,) = ax.plot(k, mean, marker="o", markersize=3, label=config_label(key, varies))
            ax.fill_between(k, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            seeds.append(int(curve["n"].iloc[0]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("k runs (seeds)")
        ax.set_ylabel("expected max dev score (x100)")
        ax.legend(fontsize="small")
        ax.set_title(_title("expected max dev", task, model, seeds))
        fig.tight_layout()
        paths.append(_save(fig, out_dir, f"expected_max_{slug(task)}_{slug(model)}.png"))
    return paths


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / PLOT_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
