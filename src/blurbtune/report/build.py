"""Build a report: collect the runs, compute the statistics, write tables and plots."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from blurbtune.report import plots, stats, tables
from blurbtune.report.collect import collect, find_results, write_runs


class NoResultsError(ValueError):
    """A sweep folder holds no readable results.json."""

    def __init__(self, message: str, errors: list[tuple[Path, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


@dataclass
class Report:
    """What one report computed, and the files it wrote (keyed by path relative to out_dir)."""

    out_dir: Path
    runs: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    expected_max: pd.DataFrame
    blurb: pd.DataFrame | None
    errors: list[tuple[Path, str]]
    written: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_out_dir(paths: list[Path]) -> Path:
    """`<first sweep>/report`."""
    first = paths[0]
    return (first if first.is_dir() else first.parent) / "report"


def build_report(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> Report:
    """Read the sweeps under `paths` and write the report to `out_dir` (default `<first>/report`).

    Raises NoResultsError naming a folder that holds no results.json, or when none can be read.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise NoResultsError("no sweep folder given")
    for path in paths:
        if not path.exists():
            raise NoResultsError(f"{path}: no such file or folder")
        if not find_results(path):
            raise NoResultsError(f"{path}: no results.json found in this folder or below it")
    found = collect(paths)
    if found.runs.empty:
        names = ", ".join(str(p) for p in paths)
        raise NoResultsError(f"{names}: none of the results.json files could be read", found.errors)

    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    out.mkdir(parents=True, exist_ok=True)
    runs = found.runs
    summary = stats.summarize(runs)
    notes = []
    published = stats.published_reference(summary)
    if published is None:
        notes.append(
            "BLURB score and published reference numbers skipped: blurbtune.blurb is not available."
        )
    else:
        summary["published_test"] = published
    blurb = stats.blurb_table(summary)
    if blurb is not None and blurb.empty:
        notes.append("No BLURB task in this sweep: no BLURB score.")
    report = Report(
        out_dir=out,
        runs=runs,
        summary=summary,
        paired=stats.paired_comparisons(runs),
        expected_max=stats.expected_max_table(runs),
        blurb=blurb,
        errors=found.errors,
        notes=notes,
    )
    written = {"runs.csv": write_runs(runs, out)}
    written |= tables.write_summary(summary, out)
    written |= tables.write_paired(report.paired, out)
    written |= tables.write_expected_max(report.expected_max, out)
    if blurb is not None and not blurb.empty:
        written |= tables.write_blurb(blurb, out)
    for path in plots.plot_scores(runs, out) + plots.plot_expected_max(report.expected_max, out):
        written[path.relative_to(out).as_posix()] = path
    report.written = written
    return report


def make_report(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the report for the sweeps under `paths`; return what was written.

    >>> make_report(["outputs/multirun/stability"])  # doctest: +SKIP
    {'runs.csv': PosixPath('outputs/multirun/stability/report/runs.csv'), ...}
    """
    return build_report(paths, out_dir).written
