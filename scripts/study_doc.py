"""Regenerate the study's report from its committed runs and refresh the tables of docs/study.md.

    python scripts/study_doc.py            # docs/study/report/ and the blocks of docs/study.md

A block in docs/study.md is `<!-- report: NAME -->` (NAME: a Markdown file of the report),
`<!-- trainer: -->` (the plain Trainer baseline's table), `<!-- selection: -->` (what
selecting on the dev set gave, from the runs' own records) or `<!-- pilot: -->` (the adapters'
learning-rate pilot), ended by `<!-- end -->`; only the text between the markers is
rewritten. tests/test_study.py checks that the doc is current.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
STUDY = ROOT / "docs" / "study"
DOC = ROOT / "docs" / "study.md"
BLOCK = re.compile(r"(<!-- (report|trainer|selection|pilot): ?(\S*) -->\n)(.*?)"
                   r"(<!-- end -->)", re.S)
PILOT = STUDY / "pilot-adapters"
# The study's learning rate: the selection table covers its settings, and a technique run at
# another lr (the adapters, at the lr their pilot chose) is compared with `none` at this one.
LR = 1e-4


def trainer_summary() -> str:
    spec = importlib.util.spec_from_file_location("study_trainer",
                                                  ROOT / "benchmarks" / "study_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summary_markdown(STUDY / "trainer")


def selection_rows(runs: Path = STUDY / "runs") -> list[dict]:
    """Per completed run: its setting (stabilizer and lr), seed, the test score of its
    best-on-dev epoch and of its last epoch, and, where the run recorded test at every epoch
    (`test_every_epoch`), the best test score over its epochs (an oracle: it looks at test)."""
    import json

    rows = []
    for path in sorted(runs.glob("*/results.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "completed":
            continue
        tests = [h["test"] for h in r["history"] if "test" in h]
        rows.append({"stabilizer": r["stabilizer"], "lr": r["lr"], "seed": r["seed"],
                     "best_on_dev": r["test"]["best"], "last": r["test"]["last"],
                     "oracle": max(tests) if len(tests) == len(r["history"]) else None})
    return rows


def selection_markdown(rows: list[dict]) -> str:
    """What picking the checkpoint on a 16-pair dev set gave on test, per setting (x100): the
    best-on-dev epoch against the last epoch (paired over the same runs) and against the best
    test epoch (an oracle, over the runs that recorded test at every epoch)."""
    import numpy as np
    from scipy import stats

    def cell(values: list[float]) -> str:
        v = 100 * np.asarray(values)
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"

    lines = ["| Stabilizer | lr | n | Best-on-dev epoch | Last epoch | Δ best-on-dev - last "
             "(paired t) | n (oracle) | Best test epoch (oracle) | Δ oracle - best-on-dev |",
             "|---|---|---|---|---|---|---|---|---|"]
    settings = {(r["stabilizer"], r["lr"]) for r in rows}
    for name, lr in sorted(settings, key=lambda s: (s[0] != "none", s[0], s[1] != LR, s[1])):
        mine = [r for r in rows if (r["stabilizer"], r["lr"]) == (name, lr)]
        best = [r["best_on_dev"] for r in mine]
        last = [r["last"] for r in mine]
        diff = 100 * (np.asarray(best) - np.asarray(last))
        p = stats.ttest_rel(best, last).pvalue if len(mine) > 1 and diff.std() > 0 else None
        seen = [r for r in mine if r["oracle"] is not None]
        gap = 100 * np.asarray([r["oracle"] - r["best_on_dev"] for r in seen])
        lines.append(
            f"| {name} | {lr:g} | {len(mine)} | {cell(best)} | {cell(last)} | {diff.mean():+.2f} "
            f"({'p=' + format(p, '.3f') if p is not None else 'no test'}) | {len(seen)} | "
            + (f"{cell([r['oracle'] for r in seen])} | {gap.mean():+.2f}" if seen else "- | -")
            + " |")
    return "\n".join(lines)


def pilot_markdown(folder: Path = PILOT) -> str:
    """The adapters' learning-rate pilot: per stabilizer and lr, each seed's best dev score
    (the only score used to choose) and whether its test predictions collapsed, the mean best
    dev, and the lr chosen (highest mean best dev; ties to the lower lr). Test is shown for
    the record, never used to choose."""
    import json
    import statistics

    runs: dict[tuple[str, float], list[dict]] = {}
    for path in sorted(folder.glob("*/results.json")):
        r = json.loads(path.read_text())
        runs.setdefault((r["stabilizer"], r["lr"]), []).append(r)
    lines = ["| Stabilizer | lr | seeds | best dev per seed (x100) | mean best dev | test per "
             "seed (x100) | collapsed on test | chosen |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted({k[0] for k in runs}):
        lrs = sorted(lr for stab, lr in runs if stab == name)

        def mean_dev(lr: float, name: str = name) -> float:
            return statistics.mean(r["dev"]["best"] if r["status"] == "completed" else
                                   float("-inf") for r in runs[(name, lr)])

        chosen = max(lrs, key=lambda lr: (mean_dev(lr), -lr))
        for lr in lrs:
            rs = sorted(runs[(name, lr)], key=lambda r: r["seed"])
            ok = [r for r in rs if r["status"] == "completed"]
            lines.append(
                f"| {name} | {lr:g} | {', '.join(str(r['seed']) for r in rs)} | "
                + ", ".join(f"{100 * r['dev']['best']:.1f}" for r in ok)
                + f" | {100 * mean_dev(lr):.1f} | "
                + ", ".join(f"{100 * r['test']['best']:.1f}" for r in ok)
                + f" | {sum(r['collapsed']['test'] for r in ok)}/{len(ok)} | "
                + ("yes" if lr == chosen else "") + " |")
    return "\n".join(lines)


def main() -> None:
    from blurbtune.report.build import build_report

    out = STUDY / "report"
    build_report([STUDY / "runs"], out, reference_lr=LR)

    def fill(m: re.Match) -> str:
        kind, name = m.group(2), m.group(3)
        body = {"report": lambda: (out / name).read_text(), "trainer": trainer_summary,
                "selection": lambda: selection_markdown(selection_rows()),
                "pilot": pilot_markdown}[kind]()
        return f"{m.group(1)}{body.strip()}\n{m.group(5)}"

    DOC.write_text(BLOCK.sub(fill, DOC.read_text()))
    print(f"wrote {out} and refreshed the tables of {DOC}")


if __name__ == "__main__":
    main()
