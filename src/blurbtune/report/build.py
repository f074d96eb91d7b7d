"""Build a report: collect the runs, compute the statistics, write tables and plots."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from blurbtune.report import checks, plots, stability, stats, tables
from blurbtune.report.collect import collect, find_results, write_runs
from blurbtune.report.folder import ReportError, check_out, staged
from blurbtune.report.identity import Configs


class NoResultsError(ReportError):
    """A sweep folder holds no readable results.json."""

    def __init__(self, message: str, errors: list[tuple[Path, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


@dataclass
class Report:
    """What one report computed, and the files it wrote (keyed by path relative to out_dir)."""

    out_dir: Path
    runs: pd.DataFrame  # every run read; `excluded` marks those of colliding configurations
    configs: Configs
    summary: pd.DataFrame
    paired: pd.DataFrame
    verdicts: pd.DataFrame
    expected_max: pd.DataFrame
    blurb: pd.DataFrame | None
    errors: list[tuple[Path, str]]
    collisions: list[str] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def included(self) -> pd.DataFrame:
        """The runs every statistic is computed over."""
        return self.runs[~self.runs["excluded"]]


def default_out_dir(paths: list[Path]) -> Path:
    """`<first sweep>/report`."""
    first = paths[0]
    return (first if first.is_dir() else first.parent) / "report"


def build_report(paths: Iterable[str | Path], out_dir: str | Path | None = None,
                 reference_lr: float | None = None) -> Report:
    """Read the sweeps under `paths` and write the report to `out_dir` (default `<first>/report`).
    `reference_lr`: compare a configuration that has no `none` at its own learning rate with
    the `none` at this one (`identity.build_configs`).

    The folder is written whole or not at all (report/folder.py): an `out_dir` that holds
    anything a report does not write is refused. Raises NoResultsError naming a folder that
    holds no results.json, or when none can be read; ReportError for an unusable `out_dir`.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise NoResultsError("no sweep folder given")
    for path in paths:
        if not path.exists():
            raise NoResultsError(f"{path}: no such file or folder")
        if path.is_file() and not find_results(path):
            raise NoResultsError(f"{path}: is a file; expected a sweep folder or a results.json")
        if not find_results(path):
            raise NoResultsError(f"{path}: no results.json found in this folder or below it")
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    check_out(out)
    found = collect(paths, reference_lr)
    if found.runs.empty:
        names = ", ".join(str(p) for p in paths)
        raise NoResultsError(f"{names}: none of the results.json files could be read", found.errors)

    configs = found.configs
    collided = stats.seed_collisions(found.runs)
    runs = found.runs.assign(excluded=found.runs[stats.GROUP].isin(collided),
                             failure=stats.is_failure(found.runs))
    included = runs[~runs["excluded"]]
    summary = stats.summarize(included, configs)
    notes = []
    published = stats.published_reference(summary)
    if published is None:
        notes.append(
            "BLURB score and published reference numbers skipped: blurbtune.blurb is not available."
        )
    else:
        summary["published_test"] = published
    blurb = stats.blurb_table(summary)
    if blurb is not None and blurb.empty and not summary.empty:
        notes.append("No BLURB task in this sweep: no BLURB score.")
    report = Report(
        out_dir=out,
        runs=runs,
        configs=configs,
        summary=summary,
        paired=stats.paired_comparisons(included, configs),
        verdicts=stability.verdicts(included, configs),
        expected_max=stats.expected_max_table(included, configs),
        blurb=blurb,
        errors=found.errors,
        collisions=checks.collisions(collided, configs),
        notes=notes,
    )
    with staged(out) as tmp:
        names = write(report, tmp)
    report.written = {name: out / name for name in names}
    return report


def write(report: Report, out: Path) -> list[str]:
    """Write the report's tables and plots into `out`; the names written, relative to it."""
    varying, included = report.configs.varying, report.included
    written = {"runs.csv": write_runs(report.runs, out)}
    written |= tables.write_summary(report.summary, out, varying, report.collisions)
    written |= tables.write_paired(report.paired, out, varying)
    written |= tables.write_verdicts(report.verdicts, out, varying)
    written |= tables.write_expected_max(report.expected_max, out)
    if report.blurb is not None and not report.blurb.empty:
        written |= tables.write_blurb(report.blurb, out)
    pngs = plots.plot_scores(included, report.configs, out)
    pngs += plots.plot_expected_max(report.expected_max, report.configs, out)
    for plot in (plots.plot_dev_curves, plots.plot_grad_norms):
        drawn, note = plot(included, report.configs, out)
        pngs += drawn
        if note:
            report.notes.append(note)
    return [*written, *(path.relative_to(out).as_posix() for path in pngs)]


def make_report(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the report for the sweeps under `paths`; return what was written.

    >>> make_report(["outputs/multirun/stability"])  # doctest: +SKIP
    {'runs.csv': PosixPath('outputs/multirun/stability/report/runs.csv'), ...}
    """
    return build_report(paths, out_dir).written
