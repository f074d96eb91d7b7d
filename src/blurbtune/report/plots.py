"""Figures: test scores over seeds and the expected-max dev curve per (model, task); dev score
per epoch and early gradient norms per part, one panel per stabilizer, failed runs in red.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing this module
never changes the user's backend.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from blurbtune.report.constants import number
from blurbtune.report.identity import Configs
from blurbtune.report.stats import GROUP, completed, finished, is_degenerate, is_failure

PLOT_DIR = "plots"
OK_COLOUR, FAILED_COLOUR = "tab:blue", "tab:red"
PANEL_COLUMNS = 3
# Dev curves and gradient norms are drawn for at most this many sets of configurations (those
# with the most failed runs): a 2,000-run sweep of 45 learning rates would otherwise draw 90
# PNGs of half a second each that nobody pages through. The note says which were not drawn.
MAX_SET_PLOTS = 4
# Above this many configurations the expected-max plot has no legend (report.html's tables
# name them); below, one line each under the axes.
MAX_LEGEND = 20


def slug(text: str) -> str:
    """A file-name-safe form of a task or model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def config_label(config: str, configs: Configs, varies: set[str]) -> str:
    """A short label: the stabilizer, plus knobs, and lr / bs / settings where they vary."""
    row = configs.table.loc[config]
    parts = [row["stabilizer"]] + (row["knobs"].split(", ") if row["knobs"] else [])
    if "lr" in varies:
        parts.append(f"lr={number(row['lr'])}")
    if "batch_size" in varies:
        parts.append(f"bs={number(row['batch_size'])}")
    parts += [f"{key}={row[key]}" for key in configs.varying if key in varies]
    return "\n".join(parts)


def varying(frame: pd.DataFrame, configs: Configs) -> set[str]:
    """Which of lr, batch size and the distinguishing settings vary among `frame`'s configs."""
    table = configs.table.loc[frame[GROUP].unique()]
    return {key for key in ("lr", "batch_size", *configs.varying)
            if table[key].nunique(dropna=False) > 1}


def _configs(frame: pd.DataFrame, configs: Configs) -> list[tuple[str, pd.DataFrame]]:
    """The frame split by configuration, in the configs' order (`none` first)."""
    groups = dict(list(frame.groupby(GROUP, sort=False)))
    return [(config, groups[config]) for config in configs.table.index if config in groups]


def _title(what: str, task: str, model: str, seeds: list[int]) -> str:
    low, high = min(seeds, default=0), max(seeds, default=0)
    n = str(low) if low == high else f"{low}-{high}"
    return f"{task} - {model}: {what} (n = {n} seeds)"


def plot_scores(runs: pd.DataFrame, configs: Configs, out_dir: Path,
                column: str = "test_best") -> list[Path]:
    """One PNG per (model, task): a box per configuration with each seed's score as a point.

    Degenerate runs are drawn as red crosses; the constant predictor's score is a dashed line.
    """
    paths = []
    done = completed(runs).dropna(subset=[column]).copy()
    done["degenerate"] = is_degenerate(done)
    for (model, task), frame in done.groupby(["model", "task"], sort=True):
        varies, groups = varying(frame, configs), _configs(frame, configs)
        fig = _figure((max(5.5, 1.6 + 1.6 * len(groups)), 4.2))
        ax = fig.subplots()
        ax.boxplot(
            [100 * g[column].to_numpy() for _, g in groups],
            showfliers=False,
            widths=0.5,
        )
        rng = np.random.default_rng(0)  # one draw per group, in order: the same jitter as ever
        jitter = np.concatenate([p + rng.uniform(-0.12, 0.12, len(g))
                                 for p, (_, g) in enumerate(groups, start=1)])
        scores = 100 * np.concatenate([g[column].to_numpy() for _, g in groups])
        bad = np.concatenate([g["degenerate"].to_numpy(dtype=bool) for _, g in groups])
        ax.scatter(jitter[~bad], scores[~bad], s=18, color=OK_COLOUR, alpha=0.8, zorder=3)
        if bad.any():
            ax.scatter(jitter[bad], scores[bad], s=30, color=FAILED_COLOUR, marker="x",
                       zorder=3, label="degenerate run")
        baseline = frame["baseline_test"].dropna()
        low, high = ax.get_ylim()
        if len(baseline) and low <= 100 * baseline.max() <= high:  # not when far below the data
            ax.axhline(100 * baseline.max(), color="grey", linestyle="--", linewidth=1,
                       label="constant predictor")  # fmt: skip
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        labels = [config_label(c, configs, varies) for c, _ in groups]
        ax.set_xticks(range(1, len(groups) + 1), labels)
        metric = frame["metric"].dropna()
        ax.set_ylabel(f"test {metric.iloc[0] if len(metric) else 'score'} (x100)")
        ax.set_title(_title("test score over seeds", task, model, [len(g) for _, g in groups]))
        lines = max((label.count("\n") + 1 for label in labels), default=1)
        fixed_layout(fig, bottom=0.35 + LINE * lines)
        paths.append(_save(fig, out_dir, f"scores_{slug(task)}_{slug(model)}.png"))
    return paths


def plot_expected_max(table: pd.DataFrame, configs: Configs, out_dir: Path) -> list[Path]:
    """One PNG per (model, task): expected max dev score over k runs (± its std), per config."""
    paths = []
    for (model, task), frame in table.groupby(["model", "task"], sort=True):
        varies = varying(frame, configs)
        n = frame[GROUP].nunique()
        legend = 0.3 + 0.17 * n if n <= MAX_LEGEND else 0.0  # inches, below the axes
        fig = _figure((8, 4.2 + legend))
        ax = fig.subplots()
        seeds = []
        for config, curve in _configs(frame, configs):
            k = curve["k"].to_numpy()
            mean, std = 100 * curve["expected_max"].to_numpy(), 100 * curve["std"].to_numpy()
            (line,) = ax.plot(k, mean, marker="o", markersize=3,
                              label=config_label(config, configs, varies).replace("\n", ", "))
            ax.fill_between(k, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            seeds.append(int(curve["n"].iloc[0]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("k runs (seeds)")
        ax.set_ylabel("expected max dev score (x100)")
        if legend:
            fig.legend(fontsize="x-small", loc="lower left", frameon=False)
        ax.set_title(_title("expected max dev", task, model, seeds))
        fixed_layout(fig, bottom=legend + 0.6)
        paths.append(_save(fig, out_dir, f"expected_max_{slug(task)}_{slug(model)}.png"))
    return paths


def _comparison_sets(runs: pd.DataFrame, configs: Configs
                     ) -> list[tuple[str, str, pd.DataFrame]]:
    """(file-name stem, title, runs) per set of configurations that differ only in stabilizer.

    The stem is `<task>_<model>`; when a model and task hold several such sets (two lr, two
    epoch counts...), the settings that tell them apart follow, e.g. `_trainer.max_epochs=2`.
    """
    done = finished(runs).copy()
    done["failure"] = is_failure(done).to_numpy()
    done["_context"] = configs.table.loc[done[GROUP], "context"].to_numpy()
    out = []
    for (model, task), block in done.groupby(["model", "task"], sort=True):
        sets = list(block.groupby("_context", sort=False))
        firsts = configs.table.loc[[frame[GROUP].iloc[0] for _, frame in sets]]
        keys = [k for k in ("lr", "batch_size", *configs.varying)
                if firsts[k].nunique(dropna=False) > 1]
        names = {"lr": "lr", "batch_size": "bs"}
        labels = [", ".join(f"{names.get(k, k)}={number(v) if k in names else v}"
                            for k, v in first[keys].items()) for _, first in firsts.iterrows()]
        unique = len(set(labels)) == len(labels)
        for (ctx, frame), label in zip(sets, labels, strict=True):
            stem, title = f"{slug(task)}_{slug(model)}", f"{task} - {model}"
            if len(sets) > 1:
                stem += "_" + slug(label.replace(", ", "_")) + ("" if unique else f"_{ctx}")
                title += f" ({label})"
            out.append((stem, title, frame))
    return out


def _looked_at(sets: list[tuple[str, str, pd.DataFrame]], what: str
               ) -> tuple[list[tuple[str, str, pd.DataFrame]], str | None]:
    """The MAX_SET_PLOTS sets with the most failed runs (in their order), and a note naming how
    many were not drawn."""
    if len(sets) <= MAX_SET_PLOTS:
        return sets, None
    failed = [int(frame["failure"].sum()) for _, _, frame in sets]
    keep = sorted(sorted(range(len(sets)), key=lambda i: -failed[i])[:MAX_SET_PLOTS])
    return [sets[i] for i in keep], (
        f"{what}: drawn for the {MAX_SET_PLOTS} of {len(sets)} sets of configurations (those "
        "differing only in stabilizer) with the most failed runs; every run is in runs.csv and "
        "in report.html's runs table.")


def _panels(n: int, size: tuple[float, float]) -> tuple[Figure, list[Any]]:
    columns = min(n, PANEL_COLUMNS)
    rows = -(-n // columns)
    fig = _figure((size[0] * columns, size[1] * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _outcome_legend(ax: Any, ok: int, failed: int) -> None:
    handles = [Line2D([], [], color=OK_COLOUR, label=f"ok (n={ok})"),
               Line2D([], [], color=FAILED_COLOUR, label=f"failed (n={failed})")]
    ax.legend(handles=handles, fontsize="small", loc="best")


def _dev_series(history: Any) -> tuple[np.ndarray, np.ndarray]:
    epochs, dev = [], []
    for entry in history if isinstance(history, list) else []:
        if "epoch" in entry and "dev" in entry:
            epochs.append(float(entry["epoch"]) + 1)  # recorded 0-based; shown as the bars
            dev.append(float("nan") if entry["dev"] is None else 100 * float(entry["dev"]))
    return np.array(epochs), np.array(dev)


def plot_dev_curves(runs: pd.DataFrame, configs: Configs, out_dir: Path
                    ) -> tuple[list[Path], str | None]:
    """Dev score per epoch: one thin line per seed, one panel per stabilizer, failed runs red.

    One PNG per set of configurations that differ only in stabilizer. Runs without a per-epoch
    history (older runs) are counted in the panel title, not drawn. Returns the files written
    and, when no run has a history, a one-line note instead.
    """
    paths = []
    sets, skipped = _looked_at(_comparison_sets(runs, configs), "Dev curves")
    for stem, title, frame in sets:
        if not frame["history"].map(lambda h: len(_dev_series(h)[0]) > 0).any():
            continue
        groups = _configs(frame, configs)
        fig, axes = _panels(len(groups), (4.0, 3.2))
        for ax, (config, group) in zip(axes, groups, strict=True):
            drawn = 0
            for _, run in group.iterrows():
                epochs, dev = _dev_series(run["history"])
                if len(epochs):
                    ax.plot(epochs, dev, linewidth=0.9, alpha=0.8,
                            color=FAILED_COLOUR if run["failure"] else OK_COLOUR)
                    drawn += 1
            baseline = group["baseline_dev"].dropna()
            if len(baseline):
                ax.axhline(100 * baseline.max(), color="grey", linestyle="--", linewidth=0.8)
            failed = int(group["failure"].sum())
            heading = config_label(config, configs, set()).replace("\n", ", ")
            heading += f"\n{len(group)} runs, {failed} failed"
            if drawn < len(group):
                heading += f", {len(group) - drawn} without history"
            ax.set_title(heading, fontsize="small")
            ax.set_xlabel("epoch (1 = first, as the progress bars count)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_ylabel(f"dev {_metric(frame)} (x100)")
        _outcome_legend(axes[0], int((~frame["failure"]).sum()), int(frame["failure"].sum()))
        fig.suptitle(f"{title}: dev score per epoch (dashed: constant predictor)")
        fixed_layout(fig, bottom=0.6, top=0.85, hspace=1.1)
        paths.append(_save(fig, out_dir, f"dev_curves_{stem}.png"))
    note = skipped if paths else "No run records a per-epoch dev history: no dev-curve plot."
    return paths, note


PART = re.compile(r"layer\.(\d+)")


def part_order(parts: set[str]) -> list[str]:
    """embeddings, layer.0 .. layer.L-1, pooler, head, then any other part; never `total`."""
    layers = sorted((p for p in parts if PART.fullmatch(p)), key=lambda p: int(p.split(".")[1]))
    known = ["embeddings", *layers, "pooler", "head"]
    others = sorted(parts - set(known) - {"total"})
    return [p for p in known if p in parts] + others


def plot_grad_norms(runs: pd.DataFrame, configs: Configs, out_dir: Path
                    ) -> tuple[list[Path], str | None]:
    """Mean gradient norm per part early in training (log scale), failed runs against the rest.

    One panel per stabilizer, a thin line per run and a thick line per outcome (the mean over
    its runs), one PNG per set of configurations that differ only in stabilizer. Returns the
    files written and, when no run records early gradient norms, a one-line note instead.
    """
    paths = []
    sets, skipped = _looked_at(_comparison_sets(runs, configs), "Gradient-norm plots")
    for stem, title, frame in sets:
        frame = frame[frame["grad_norm_early"].map(lambda g: isinstance(g, dict) and bool(g))]
        if frame.empty:
            continue
        parts = part_order({p for g in frame["grad_norm_early"] for p in g})
        x = np.arange(len(parts))
        groups = _configs(frame, configs)
        fig, axes = _panels(len(groups), (max(4.0, 0.45 * len(parts) + 1.5), 3.4))
        for ax, (config, group) in zip(axes, groups, strict=True):
            for failed, colour in ((False, OK_COLOUR), (True, FAILED_COLOUR)):
                mine = group[group["failure"] == failed]
                norms = np.array([[_positive(g.get(p)) for p in parts]
                                  for g in mine["grad_norm_early"]]).reshape(len(mine), len(parts))
                for line in norms:
                    ax.plot(x, line, color=colour, linewidth=0.7, alpha=0.35)
                if len(norms):
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # a part no run has
                        ax.plot(x, np.nanmean(norms, axis=0), color=colour, linewidth=2.2)
            failed = int(group["failure"].sum())
            heading = config_label(config, configs, set()).replace("\n", ", ")
            ax.set_title(f"{heading}\n{len(group)} runs, {failed} failed", fontsize="small")
            ax.set_yscale("log")
            ax.set_xticks(x, parts, rotation=60, fontsize="x-small")
        axes[0].set_ylabel("mean grad norm, early steps")
        _outcome_legend(axes[0], int((~frame["failure"]).sum()), int(frame["failure"].sum()))
        fig.suptitle(f"{title}: gradient norm per part early in training "
                     "(thin: one run; thick: mean)")
        ticks = 0.3 + 0.055 * max(len(p) for p in parts)  # x-small, turned by 60 degrees
        fixed_layout(fig, bottom=ticks, top=0.85, hspace=ticks + 0.45)
        paths.append(_save(fig, out_dir, f"grad_norm_early_{stem}.png"))
    note = skipped if paths else (
        "No run records early gradient norms (diagnostics.grad_norm.early): no gradient plot.")
    return paths, note


def _positive(value: Any) -> float:
    """A norm for a log axis: NaN when absent, zero or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if value > 0 else float("nan")


def _metric(frame: pd.DataFrame) -> str:
    metric = frame["metric"].dropna()
    return str(metric.iloc[0]) if len(metric) else "score"


# A line of 10-point text, in inches (the tick labels' size; `small` is 0.83 of it).
LINE = 0.17
MIN_PANEL = 1.5  # inches


def fixed_layout(fig: Figure, bottom: float, top: float = 0.4, left: float = 0.75,
                 right: float = 0.2, hspace: float = 0.0, wspace: float = 0.3) -> None:
    """Margins and the gaps between panels in inches, set once: `tight_layout` would draw the
    figure a second time to measure its text, which for these plots doubles their cost. A
    figure whose margins would leave a panel less than MIN_PANEL inches is made taller or
    wider."""
    rows, columns = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    width, height = fig.get_size_inches()
    width = max(width, left + right + (columns - 1) * wspace + columns * MIN_PANEL)
    height = max(height, top + bottom + (rows - 1) * hspace + rows * MIN_PANEL)
    fig.set_size_inches(width, height)
    panel_w = (width - left - right - (columns - 1) * wspace) / columns
    panel_h = (height - top - bottom - (rows - 1) * hspace) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace / panel_w, hspace=hspace / panel_h)


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / PLOT_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 3: two thirds of the default's time for 5% more bytes (page.py re-encodes)
    fig.savefig(path, dpi=120, pil_kwargs={"compress_level": 3})
    return path
