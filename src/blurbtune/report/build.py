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
from blurbtune.report.page import write_page


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
    collisions_found: list[str] = field(default_factory=list)  # their config ids
    written: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # build.left_out's sections

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
    if reference_lr is not None and not reference_lr > 0:
        raise ReportError(f"--reference-lr {reference_lr}: expected a learning rate > 0")
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    check_out(out)
    found = collect(paths, reference_lr)
    if found.runs.empty:
        names = ", ".join(str(p) for p in paths)
        raise NoResultsError(f"{names}: none of the results.json files could be read", found.errors)

    configs = found.configs
    collided = stats.seed_collisions(found.runs)
    runs = found.runs.assign(failure=stats.is_failure(found.runs))
    runs.loc[runs[stats.GROUP].isin(collided) & (runs["left_out"] == ""), "left_out"] = (
        "its configuration holds two finished runs of the same seeds")
    runs["excluded"] = runs["left_out"] != ""
    included = runs[~runs["excluded"]]
    summary = stats.summarize(included, configs)
    summary["versions_note"] = checks.mixed_versions(included, summary[stats.GROUP])
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
        collisions_found=list(collided),
        notes=notes,
    )
    if reference_lr is not None:
        report.notes += checks.no_reference_at(report.verdicts, reference_lr)
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
    report.left_out = left_out(report)
    page = write_page(report, out, pngs, report.left_out)
    return [*written, *(path.relative_to(out).as_posix() for path in pngs),
            page.relative_to(out).as_posix()]


def left_out(report: Report) -> dict[str, list[str]]:
    """What the reader must be told was left out or is not ordinary, with why (section title ->
    one line per configuration, run or file); the console and the page list the same."""
    configs, included = report.configs, report.included
    failed, running = checks.unfinished(included, configs)
    unusable = report.runs[report.runs["excluded"] & ~report.runs[stats.GROUP].isin(
        report.collisions_found)]
    return {
        # left out of the statistics: shown first
        f"Configurations with two finished runs of the same seeds ({len(report.collisions)}), "
        "left out of every table, test and plot:": report.collisions,
        f"Completed runs without a usable score ({len(unusable)}), left out of every table, "
        "test and plot:": [f"{path}: {reason}" for path, reason in
                           unusable[["path", "left_out"]].itertuples(index=False)],
        f"Unreadable results.json ({len(report.errors)}), skipped:":
            [f"{path}: {reason}" for path, reason in report.errors],
        # in the statistics, or not a result: what to know about them
        f"Failed or diverged runs ({len(failed)}), not in the means:": failed,
        f"Still running ({len(running)}), not in the means:": running,
        "Degenerate runs (counted in the means, and as failures):":
            checks.degenerate(included, configs),
        "Partial sweep: configurations with fewer seeds than the largest one:":
            checks.missing_seeds(included, configs),
        "Configurations whose runs mix code or library versions (pooled; a note in the row):":
            [f"{configs.label(c)}: {note}" for c, note in
             report.summary[[stats.GROUP, "versions_note"]].itertuples(index=False) if note],
    }


def make_report(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the report for the sweeps under `paths`; return what was written.

    >>> make_report(["outputs/multirun/stability"])  # doctest: +SKIP
    {'runs.csv': PosixPath('outputs/multirun/stability/report/runs.csv'), ...}
    """
    return build_report(paths, out_dir).written
