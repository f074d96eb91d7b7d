"""A report folder holds one whole report or none: it is written beside `--out` and renamed in.

Two `blurbtune report` processes on one `--out` used to interleave their files (runs.csv of one
sweep, stability.md of the other, a torn expected_max.csv). Now each writes a hidden folder next
to `--out` and renames it into place; an older report there is first renamed away, then
deleted. A reader sees the old report, the new one, or (for an instant) none; never a mix.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blurbtune.io import writing

# Every file a report can write (tests/test_report_folder.py keeps this list complete); a
# folder holding anything else is not a report, and is never replaced.
REPORT_FILES = frozenset({
    "runs.csv", "summary.csv", "summary.md", "summary.tex", "stability.md", "stability.tex",
    "paired.csv", "paired.md", "verdict.csv", "verdict.md", "expected_max.csv", "blurb.csv",
    "blurb.md", "report.html",
})
PLOTS = "plots"
ATTEMPTS = 20  # a report renamed in by another process between two steps: try again


class ReportError(ValueError):
    """A report cannot be written as asked (one line, for `blurbtune report: error: ...`)."""


def foreign(folder: Path) -> list[str]:
    """What in `folder` no report writes (sorted names; plots/ may hold only .png files)."""
    names = []
    for entry in sorted(folder.iterdir()):
        if entry.name == PLOTS and entry.is_dir():
            names += [f"{PLOTS}/{p.name}" for p in sorted(entry.iterdir())
                      if p.suffix != ".png" or not p.is_file()]
        elif entry.name not in REPORT_FILES or not entry.is_file():
            names.append(entry.name)
    return names


def check_out(out: Path) -> None:
    """Refuse an `--out` that is a file, or a folder holding what a report did not write."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: is a file; expected a folder for the report")
    if out.is_dir():
        others = foreign(out)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                             else "")
            raise ReportError(f"--out {out}: holds {shown}, which no report writes; a report "
                              "replaces its whole folder, so give a new or empty folder")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out` to write the report into; renamed to `out` when the
    block ends, removed if it raises (the report at `out`, if any, is then left as it was). A
    folder that cannot be written (a full disk, no permission) is a ReportError."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        with writing(tmp):  # a plotting or table library's own error on a full disk: ENOSPC
            yield tmp
        publish(tmp, out)
    except OSError as e:
        raise ReportError(f"--out {out}: the report could not be written ({e.strerror or e}); "
                          "nothing was changed there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; a report already at `out` is renamed away first, then deleted."""
    set_aside = []
    try:
        for _ in range(ATTEMPTS):
            try:
                os.rename(tmp, out)  # out absent, or an empty folder: replaced at once
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            check_out(out)
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
            try:
                os.rename(out, old)
            except FileNotFoundError:  # another report moved it away first
                continue
            set_aside.append(old)
        raise ReportError(f"--out {out}: other reports kept replacing it; try again")
    finally:
        for old in set_aside:
            shutil.rmtree(old, ignore_errors=True)
