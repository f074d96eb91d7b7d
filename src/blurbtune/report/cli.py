"""`blurbtune report SWEEP [SWEEP ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blurbtune.report.build import Report


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="blurbtune report",
        description="Tables and plots from the results.json files of one or more sweeps.",
    )
    parse.add_argument("sweeps", nargs="+", type=Path, metavar="SWEEP", help="sweep folder")
    parse.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <first SWEEP>/report)"
    )
    parse.add_argument(
        "--reference-lr", type=float, default=None, metavar="LR",
        help="compare a configuration with no `none` at its own lr (e.g. LoRA at the lr that "
             "suits it) with `none` at LR, otherwise identical")
    return parse


def _section(title: str, lines: list[str], stream=sys.stdout) -> None:
    if lines:
        print(f"\n{title}", file=stream)
        for line in lines:
            print(f"  - {line}", file=stream)


def print_report(report: Report) -> None:
    """Tables and written files on stdout; problems with the sweep on stderr."""
    from blurbtune.report import checks, tables

    varying = report.configs.varying
    print(tables.summary_markdown(report.summary, varying))
    print("Stability: failures and spread per configuration\n")
    print(tables.stability_markdown(report.summary, varying))
    if report.blurb is not None and not report.blurb.empty:
        print("BLURB (x100; per task the configuration with the best mean dev score)\n")
        print(tables.markdown_table(tables.blurb_display(report.blurb)))
    if not report.paired.empty:
        print("Paired against `none` (test, x100)\n")
        print(tables.markdown_table(tables.paired_display(report.paired, varying)))
    if not report.verdicts.empty:
        print("Verdict: each stabilizer against `none`\n")
        print(tables.verdict_markdown(report.verdicts, varying))
    for note in report.notes:
        print(f"Note: {note}")
    print(f"\nWrote {len(report.written)} files to {report.out_dir}:")
    for name in report.written:
        print(f"  {name}")

    err = sys.stderr
    sections = report.left_out
    if report.collisions:
        _banner(
            f"!! LEFT OUT: {len(report.collisions)} CONFIGURATION(S) WITH TWO FINISHED RUNS OF "
            "THE SAME SEEDS. Not in any table, test or plot until one run of each pair is "
            "removed or rerun under another seed:",
            report.collisions,
        )
    bad = checks.degenerate(report.included, report.configs)
    if bad:
        _banner(
            f"!! WARNING: {len(bad)} DEGENERATE RUN(S): no better than the constant predictor "
            "on test, or constant predictions. They are counted in the means, and as failures.",
            bad,
        )
    for title, lines in list(sections.items())[1:]:
        if not title.startswith("Degenerate"):
            _section(title, lines, err)


def _banner(title: str, lines: list[str]) -> None:
    stream = sys.stderr
    print(f"\n{'!' * 72}", file=stream)
    print(title, file=stream)
    print("!" * 72, file=stream)
    for line in lines:
        print(f"  - {line}", file=stream)


def main(argv: list[str] | None = None) -> int:
    """Run `blurbtune report`; 0 on success, 2 when a sweep folder holds no results or `--out`
    cannot take the report."""
    args = parser().parse_args(argv)
    if args.reference_lr is not None and not args.reference_lr > 0:
        print(f"blurbtune report: error: --reference-lr {args.reference_lr}: expected a "
              "learning rate > 0", file=sys.stderr)
        return 2
    from blurbtune.report.build import build_report  # pandas, scipy, matplotlib
    from blurbtune.report.folder import ReportError

    try:
        report = build_report(args.sweeps, args.out, args.reference_lr)
    except ReportError as exc:
        print(f"blurbtune report: error: {exc}", file=sys.stderr)
        for path, reason in getattr(exc, "errors", []):
            print(f"  - {path}: {reason}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
