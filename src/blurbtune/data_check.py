"""`blurbtune data check [DATA_DIR]`: which BLURB datasets a folder holds, and their sizes.

Sizes are in BLURB's units (entity mentions, PICO-tagged words, pairs, abstracts, questions)
beside Gu et al. (2021) Table 3, so a user sees at once what is missing or differs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from blurbtune.blurb import tasks
from blurbtune.data import SPLITS, read_split, split_path
from blurbtune.errors import DataError
from blurbtune.tasks import task_type


@dataclass
class SplitCheck:
    task: str
    split: str
    expected: int
    found: int | None  # None: missing or unreadable
    note: str = ""

    @property
    def status(self) -> str:
        """ok, differs, missing or error (the reason is in `note`)."""
        if self.found is None:
            return "error" if self.note else "missing"
        return "ok" if self.found == self.expected else "differs"


def check(data_dir: str | Path) -> list[SplitCheck]:
    """Count every split of every BLURB dataset under `data_dir`."""
    out = []
    for name, task in tasks().items():
        for split in SPLITS:
            expected = int(task.blurb.counts[split])
            try:
                split_path(task, data_dir, split)
            except DataError:
                out.append(SplitCheck(name, split, expected, None))
                continue
            try:
                examples = read_split(task, data_dir, split).examples
            except DataError as e:
                out.append(SplitCheck(name, split, expected, None, str(e)))
                continue
            found = task_type(task.type).count(examples, task)
            out.append(SplitCheck(name, split, expected, found))
    return out


def format_table(checks: list[SplitCheck]) -> str:
    reg = tasks()
    lines = [f"{'dataset':<14}{'folder':<16}{'unit':<10}"
             + "".join(f"{s + ' found/Gu':>22}" for s in SPLITS) + "  status"]
    lines.append("-" * len(lines[0]))
    errors = []
    for name, task in reg.items():
        rows = {c.split: c for c in checks if c.task == name}
        cells, statuses = [], set()
        for split in SPLITS:
            c = rows[split]
            found = "-" if c.found is None else f"{c.found:,}"
            cells.append(f"{found + ' / ' + format(c.expected, ','):>22}")
            statuses.add(c.status)
            if c.status == "error":
                errors.append(f"  {name}/{split}: {c.note}")
        if statuses == {"ok"}:
            status = "ok"
        elif statuses == {"missing"}:
            status = "not found"
        else:
            status = ", ".join(f"{s} {'/'.join(sp for sp in SPLITS if rows[sp].status == s)}"
                               for s in ("missing", "differs", "error") if s in statuses)
        lines.append(f"{task.blurb.display:<14}{task.folder:<16}{task.blurb.unit:<10}"
                     + "".join(cells) + f"  {status}")
    if errors:
        lines += ["", "unreadable files:", *errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blurbtune data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="list the BLURB datasets under a folder with split sizes")
    p.add_argument("data_dir", nargs="?", default=os.environ.get("BLURB_DATA_DIR", "data/blurb"))
    args = parser.parse_args(argv)
    root = Path(args.data_dir).expanduser()
    if not root.is_dir():
        print(f"error: {root}: no such folder (expected BLURB's data_generation layout)")
        return 2
    checks = check(root)
    print(f"BLURB datasets under {root} (sizes in BLURB's units; Gu et al. 2021, Table 3)\n")
    print(format_table(checks))
    found = {c.task for c in checks if c.found is not None}
    print(f"\n{len(found)} of {len(tasks())} datasets found; "
          f"{sum(c.status == 'ok' for c in checks)} of {len(checks)} splits match Table 3.")
    return 1 if any(c.status == "error" for c in checks) else 0
