"""`blurbtune data check [DATA_DIR]`: which BLURB datasets a folder holds, and their sizes.

Sizes are in BLURB's units (entity mentions, PICO-tagged words, pairs, abstracts, questions)
beside Gu et al. (2021) Table 3, so a user sees at once what is missing or differs, and why
where the reason is known (`blurb.known_counts` in the task's config). Exit status: 1 when a
split is missing or unreadable (for CI), else 0.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from blurbtune.blurb import tasks
from blurbtune.data import SPLITS, read_split
from blurbtune.errors import DataError
from blurbtune.tasks import task_type


@dataclass
class SplitCheck:
    task: str
    split: str
    expected: int
    found: int | None  # None: missing or unreadable
    note: str = ""  # why it is unreadable, or why the count differs where that is known
    known: int | None = None  # a count that differs from Table 3 for the reason in `note`

    @property
    def status(self) -> str:
        """ok, known (differs for the reason in `note`), differs, missing or error (the reason
        is in `note`)."""
        if self.found is None:
            return "error" if self.note else "missing"
        if self.found == self.expected:
            return "ok"
        return "known" if self.found == self.known else "differs"


def check(data_dir: str | Path) -> list[SplitCheck]:
    """Count every split of every BLURB dataset under `data_dir`."""
    out = []
    for name, task in tasks().items():
        for split in SPLITS:
            expected = int(task.blurb.counts[split])
            known = (task.blurb.get("known_counts") or {}).get(split)
            try:
                examples = read_split(task, data_dir, split).examples
            except DataError as e:
                there = Path(e.path).exists()  # else missing; there but unreadable: an error
                out.append(SplitCheck(name, split, expected, None, str(e) if there else ""))
                continue
            found = task_type(task.type).count(examples, task)
            if known is not None and found == int(known.found):
                out.append(SplitCheck(name, split, expected, found, str(known.why), found))
            else:
                out.append(SplitCheck(name, split, expected, found))
    return out


def folders() -> set[str]:
    """The dataset folders of BLURB's layout (BIOSSES, NCBI-disease, pubmedqa...)."""
    return {str(task.folder) for task in tasks().values()}


def format_table(checks: list[SplitCheck]) -> str:
    reg = tasks()
    lines = [f"{'dataset':<14}{'folder':<16}{'unit':<10}"
             + "".join(f"{s + ' found/Gu':>22}" for s in SPLITS) + "  status"]
    lines.append("-" * len(lines[0]))
    errors, notes = [], []
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
            if c.status == "known":
                notes.append(f"  {name}/{split}: {c.found:,} vs {c.expected:,}: {c.note}")
        if statuses == {"ok"}:
            status = "ok"
        elif statuses == {"missing"}:
            status = "not found"
        else:
            words = {"known": "known difference"}
            status = ", ".join(
                f"{words.get(s, s)} {'/'.join(sp for sp in SPLITS if rows[sp].status == s)}"
                for s in ("missing", "differs", "known", "error") if s in statuses)
        lines.append(f"{task.blurb.display:<14}{task.folder:<16}{task.blurb.unit:<10}"
                     + "".join(cells) + f"  {status}")
    if notes:
        lines += ["", "known differences from Table 3:", *notes]
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
    known = sum(c.status == "known" for c in checks)
    print(f"\n{len(found)} of {len(tasks())} datasets found; "
          f"{sum(c.status == 'ok' for c in checks)} of {len(checks)} splits match Table 3"
          + (f", {known} more differ for a known reason." if known else "."))
    if not found and ((root / "train.tsv").is_file() or root.name in folders()):
        print(f"{root} looks like the folder of one dataset: give the folder that holds the "
              f"dataset folders (here {root.resolve().parent}).")
    bad = [c for c in checks if c.status in ("missing", "error")]
    if bad:
        print(f"{len(bad)} split(s) missing or unreadable: exit status 1.")
    return 1 if bad else 0
