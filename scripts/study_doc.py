"""Regenerate the study's report from its committed runs and refresh the tables of docs/study.md.

    python scripts/study_doc.py            # docs/study/report/ and the blocks of docs/study.md

A block in docs/study.md is `<!-- report: NAME -->` (NAME: a Markdown file of the report) or
`<!-- trainer: -->` (the plain Trainer baseline's table), ended by `<!-- end -->`; only the
text between the markers is rewritten. tests/test_study.py checks that the doc is current.
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
BLOCK = re.compile(r"(<!-- (report|trainer): ?(\S*) -->\n)(.*?)(<!-- end -->)", re.S)


def trainer_summary() -> str:
    spec = importlib.util.spec_from_file_location("study_trainer",
                                                  ROOT / "benchmarks" / "study_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summary_markdown(STUDY / "trainer")


def main() -> None:
    from blurbtune.report.build import build_report

    out = STUDY / "report"
    build_report([STUDY / "runs"], out)

    def fill(m: re.Match) -> str:
        kind, name = m.group(2), m.group(3)
        body = (out / name).read_text() if kind == "report" else trainer_summary()
        return f"{m.group(1)}{body.strip()}\n{m.group(5)}"

    DOC.write_text(BLOCK.sub(fill, DOC.read_text()))
    print(f"wrote {out} and refreshed the tables of {DOC}")


if __name__ == "__main__":
    main()
