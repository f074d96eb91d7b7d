"""Write the report's tables: CSV with raw fractions, Markdown and LaTeX with scores x100."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blurbtune.report import power, sample_size
from blurbtune.report.constants import (
    ALPHA,
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    MISSING,
    REFERENCE_STABILIZER,
    number,
)

DIGITS = 2


def x100(value: Any, digits: int = DIGITS) -> str:
    """A fraction shown as BLURB shows scores: 0.8123 -> "81.23"."""
    return MISSING if pd.isna(value) else f"{100 * float(value):.{digits}f}"


def mean_std(mean: Any, std: Any, digits: int = DIGITS) -> str:
    """Mean and spread as "81.23 ± 1.05", or just the mean when there is no spread."""
    if pd.isna(std):
        return x100(mean, digits)
    return f"{x100(mean, digits)} ± {x100(std, digits)}"


def p_value(value: Any) -> str:
    if pd.isna(value):
        return MISSING
    return "<0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def note_of(row: pd.Series, column: str) -> str:
    """A test's or interval's note (why it has no p or bounds), "" when it has none; reports
    written before the notes existed have no such column."""
    value = row.get(column, "")
    return "" if pd.isna(value) else str(value)


def claim(row: pd.Series, test: str, sizes: str) -> str:
    """`p=0.123, n=5 vs 5`, or the note saying why the test has no p (`n too small: 2 vs 2,
    needs ≥3 a group`; another reason is followed by the sizes)."""
    note = note_of(row, f"{test}_note")
    if note.startswith(sample_size.TOO_SMALL):
        return note
    return ", ".join(part for part in (note or f"p={p_value(row[f'{test}_p'])}", sizes) if part)


def interval(row: pd.Series, prefix: str, show: Any = x100) -> str:
    """`[low, high]` of `<prefix>_low/_high`, or its note (`n too small: ...`), or "-"."""
    if pd.notna(row[f"{prefix}_low"]):
        return f"[{show(row[f'{prefix}_low'])}, {show(row[f'{prefix}_high'])}]"
    return note_of(row, f"{prefix}_note") or MISSING


def percent(value: Any) -> str:
    return MISSING if pd.isna(value) else f"{100 * float(value):.0f}%"


# Columns every table starts with; the identity keys that tell two configurations apart follow.
DESCRIPTION = {"model": "Model", "task": "Task", "stabilizer": "Stabilizer", "knobs": "Knobs",
               "lr": "lr", "batch_size": "bs"}


def config_cells(row: pd.Series, varying: Sequence[str] = (), show_knobs: bool = True
                 ) -> dict[str, str]:
    """Model, task, stabilizer, knobs, lr, bs and every setting that distinguishes this row
    (`varying`: the identity keys that tell apart two configurations of one model and task)."""
    out = {}
    for key, title in DESCRIPTION.items():
        if key == "knobs" and not show_knobs:
            continue
        value = row[key]
        out[title] = number(value) if key in ("lr", "batch_size") else (value or MISSING)
    for key in varying:
        out[key] = MISSING if pd.isna(row[key]) else str(row[key])
    return out


def summary_display(summary: pd.DataFrame, varying: Sequence[str] = ()) -> pd.DataFrame:
    """The summary as strings, one column per thing a reader compares."""
    show_knobs = bool(summary["knobs"].astype(bool).any()) if len(summary) else False
    show_published = "published_test" in summary and summary["published_test"].notna().any()
    rows = []
    for _, row in summary.iterrows():
        out = config_cells(row, varying, show_knobs)
        out |= {
            "n/runs": f"{row['n']}/{row['runs']}",
            "Test best": mean_std(row["test_best_mean"], row["test_best_std"]),
            "Median [min, max]": (
                MISSING
                if pd.isna(row["test_best_median"])
                else f"{x100(row['test_best_median'])} "
                f"[{x100(row['test_best_min'])}, {x100(row['test_best_max'])}]"
            ),
            f"{CONFIDENCE:.0%} CI": interval(row, "test_best_ci"),
            "Test last": mean_std(row["test_last_mean"], row["test_last_std"]),
            "Dev best": mean_std(row["dev_best_mean"], row["dev_best_std"]),
            "Degenerate": str(row["degenerate"]),
        }
        if show_published:
            out["Published"] = x100(row["published_test"])
        rows.append(out | versions_cell(summary, row))
    return pd.DataFrame(rows)


def versions_cell(summary: pd.DataFrame, row: pd.Series) -> dict[str, str]:
    """{"Mixed versions": note} when some configuration mixes code or library versions."""
    if "versions_note" not in summary or not summary["versions_note"].fillna("").any():
        return {}
    return {"Mixed versions": note_of(row, "versions_note") or MISSING}


def paired_display(paired: pd.DataFrame, varying: Sequence[str] = ()) -> pd.DataFrame:
    """The paired comparisons as strings."""
    rows = []
    for _, row in paired.iterrows():
        rows.append(
            config_cells(row, varying)
            | {
                "n": str(row["n"]),
                "Mean diff": f"{100 * row['mean_diff']:+.{DIGITS}f}",
                "W/T/L": f"{row['wins']}/{row['ties']}/{row['losses']}",
                "Wilcoxon p": note_of(row, "wilcoxon_note") or p_value(row["wilcoxon_p"]),
                "t-test p": note_of(row, "ttest_note") or p_value(row["ttest_p"]),
            }
        )
    return pd.DataFrame(rows)


def stability_display(summary: pd.DataFrame, varying: Sequence[str] = ()) -> pd.DataFrame:
    """Failures and spread per configuration, as strings."""
    show_knobs = bool(summary["knobs"].astype(bool).any()) if len(summary) else False
    rows = []
    for _, row in summary.iterrows():
        rate = interval(row, "failure_ci", percent)
        if row["finished"]:
            rate = f"{percent(row['failure_rate'])} {rate}"
        std = x100(row["test_best_std"])
        if pd.notna(row["test_best_std"]):
            ci = interval(row, "test_best_std_ci")
            std += f" {ci}" if ci.startswith("[") else f" ({ci})"
        rows.append(
            config_cells(row, varying, show_knobs)
            | {
                "Failures": f"{row['failures']}/{row['finished']}",
                f"Failure rate [{CONFIDENCE:.0%} CI]": rate,
                "n": str(row["n"]),
                "Test mean": x100(row["test_best_mean"]),
                f"Std [{CONFIDENCE:.0%} CI]": std,
            }
            | versions_cell(summary, row)
        )
    return pd.DataFrame(rows)


STABILITY_NOTE = (
    "Failures: diverged runs, and completed runs no better than the constant predictor on test "
    "or with constant test predictions (degenerate), out of the finished (completed or "
    f"diverged) runs; {CONFIDENCE:.0%} Wilson interval. Test mean and std (x100, sample std) "
    "over the n completed runs' test scores (best dev checkpoint), degenerate runs included; "
    "diverged runs have no test score and are in neither. Std CI: "
    f"{CONFIDENCE:.0%} {BOOTSTRAP_METHOD} bootstrap ({BOOTSTRAP_RESAMPLES} resamples, "
    f"seed {BOOTSTRAP_SEED}); below {sample_size.bootstrap_std_min(CONFIDENCE)} runs it cannot "
    "cover the true std even at its widest, and the cell says n too small.\n"
)


def _ratio(value: Any) -> str:
    if pd.isna(value):
        return MISSING
    return "inf" if np.isinf(value) else f"{float(value):.2f}"


def verdict_display(verdicts: pd.DataFrame, varying: Sequence[str] = ()) -> pd.DataFrame:
    """The verdict table as strings: every claim with its p-value and n."""
    rows = []
    for _, row in verdicts.iterrows():
        cells = config_cells(row, varying)
        if pd.isna(row["ref_config"]):  # no `none` to compare with: the verdict says so
            rows.append(cells | dict.fromkeys(VERDICT_CELLS, MISSING) | {
                "Verdict": row["verdict"]})
            continue
        n = {key: number(row[key]) for key in (
            "n_pairs", "n_std", "n_std_ref", "failures", "finished", "failures_ref",
            "finished_ref")}
        mean = claim(row, "ttest", f"n={n['n_pairs']} pairs")
        spread = claim(row, "brown_forsythe", f"n={n['n_std']} vs {n['n_std_ref']}")
        rows.append(
            cells
            | {
                "Δ mean (x100)": f"{_points(row['mean_diff'], DIGITS, '')} ({mean})",
                "Std ratio": f"{_ratio(row['std_ratio'])} ({spread})",
                "Failures": f"{n['failures']}/{n['finished']} vs "
                f"{n['failures_ref']}/{n['finished_ref']} "
                f"({_points(row['failure_rate_diff'])}, {claim(row, 'fisher', '')})",
                "Verdict": row["verdict"] + (
                    f" (against none at lr {number(row['reference_lr'])})"
                    if pd.notna(row.get("reference_lr")) else ""),
                DETECTABLE: detectable(row),
            }
        )
    return pd.DataFrame(rows)


DETECTABLE = f"Detectable at this n (α {ALPHA}, power {power.POWER})"
VERDICT_CELLS = ("Δ mean (x100)", "Std ratio", "Failures", "Verdict", DETECTABLE)
NONE_POSSIBLE = "none possible at this n"


def detectable(row: pd.Series) -> str:
    """The power line of a verdict row: `|Δ mean| ≥ 12.3; std ratio ≤ 0.45 or ≥ 2.20; failure
    rate +38 pp / -20 pp`; a test without a p shows its note instead, as its p cell does."""
    def part(test: str, name: str, value: str) -> str:
        note = note_of(row, f"{test}_note")
        return f"{name}: {note}" if note else value

    mean = f"|Δ mean| ≥ {100 * row['mean_mde']:.1f}"
    down, up = row["std_ratio_mde_down"], row["std_ratio_mde_up"]
    std = f"std ratio: {NONE_POSSIBLE}"
    if pd.notna(down) or pd.notna(up):
        sides = [f"≤ {_ratio(down)}" if pd.notna(down) else "",
                 f"≥ {_ratio(up)}" if pd.notna(up) else ""]
        std = f"std ratio {' or '.join(side for side in sides if side)}"
        if not all(sides):
            std += f" ({'none below 1' if pd.isna(down) else 'none above 1'} at this n)"
    fail_down, fail_up = row["fail_mde_down"], row["fail_mde_up"]
    fails = f"failure rate: {NONE_POSSIBLE}"
    if pd.notna(fail_down) or pd.notna(fail_up):
        higher = _points(fail_up) if pd.notna(fail_up) else "none higher at this n"
        lower = _points(fail_down) if pd.notna(fail_down) else "none lower at this n"
        fails = f"failure rate {higher} / {lower}"
    return "; ".join([part("ttest", "|Δ mean|", mean), part("brown_forsythe", "std ratio", std),
                      part("fisher", "failure rate", fails)])


def _points(value: Any, digits: int = 0, unit: str = " pp") -> str:
    return MISSING if pd.isna(value) else f"{100 * float(value):+.{digits}f}{unit}"


VERDICT_NOTE = (
    f"Each stabilizer against `{REFERENCE_STABILIZER}` in an otherwise identical configuration, "
    "on test (best dev checkpoint). Δ mean: mean difference over the seeds both completed, "
    "paired t-test. Std ratio: stabilizer's std / none's, over completed runs, Brown-Forsythe "
    "test (Levene about the median). Failures: diverged or degenerate out of finished runs, "
    "stabilizer vs none, difference in percentage points, Fisher's exact test. Each test is "
    f"two-sided at alpha {ALPHA}; better = higher mean, smaller std, fewer failures. Verdict: "
    "better (or worse) when at least one test says so and none says the opposite, mixed when "
    "they disagree, 'no difference at this n' when none is significant: not evidence of no "
    f"effect. A test below its minimum n (t-test {sample_size.TTEST_PAIRS} pairs, "
    f"Brown-Forsythe {sample_size.BROWN_FORSYTHE_GROUP} runs a group, Fisher "
    f"{sample_size.FISHER_GROUP} finished run a group) says n too small and decides nothing "
    "(not tested). "
    f"Detectable at this n: the smallest difference each test would find at alpha {ALPHA} "
    f"with power {power.POWER}, taking what was observed as the truth: |Δ mean| (x100) from "
    "the std of the paired differences (noncentral t); the std ratio below and above 1 for "
    f"normal scores (Monte Carlo, {power.STD_DRAWS} draws, seed {power.STD_SEED}); the failure "
    "rate above and below none's (exact); 'none possible at this n' where no difference would "
    "reach that power. A 'no difference' can hide any difference smaller than these.\n"
)


def blurb_display(blurb: pd.DataFrame) -> pd.DataFrame:
    """The per-task BLURB table as strings."""
    rows = []
    for _, row in blurb.iterrows():
        rows.append(
            {
                "Model": row["model"],
                "Stabilizer": row["stabilizer"],
                "Knobs": row["knobs"] or MISSING,
                "Task": row["task"],
                "lr": number(row["lr"]),
                "n": number(row["n"]),
                "Test mean": x100(row["test_mean"]),
                "Published": x100(row["published"]),
                "Note": row["note"],
            }
        )
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a frame of strings."""
    if frame.empty:
        return "(no rows)\n"

    def cells(values: Any) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [cells(frame.columns), "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += [cells(row) for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and write ± in math mode."""
    escaped = "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))
    return escaped.replace("±", r"$\pm$")


def latex_table(frame: pd.DataFrame) -> str:
    """A booktabs tabular of a frame of strings (hand-built: pandas' LaTeX needs jinja2)."""
    align = "l" * min(3, len(frame.columns)) + "r" * max(0, len(frame.columns) - 3)
    lines = [
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in frame.columns) + r" \\",
        r"\midrule",
    ]
    for row in frame.itertuples(index=False):
        lines.append(" & ".join(latex_escape(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _left_out(excluded: Sequence[str]) -> str:
    if not excluded:
        return ""
    lines = "".join(f"- {line}\n" for line in excluded)
    return ("\nLeft out of every table, test and plot until resolved (two finished runs with "
            f"the same seeds would count a seed twice):\n\n{lines}")


SUMMARY_NOTE = (
    "Scores x100 over completed runs: mean ± sample std. "
    f"CI: {CONFIDENCE:.0%} {BOOTSTRAP_METHOD} bootstrap of the mean test score (needs "
    f"{sample_size.bootstrap_mean_min(CONFIDENCE)} runs to be able to cover the mean). "
    "Degenerate: completed runs no better than the constant predictor on test, "
    "or with constant test predictions (they stay in the means).\n"
)


def summary_markdown(summary: pd.DataFrame, varying: Sequence[str] = (),
                     excluded: Sequence[str] = ()) -> str:
    """The summary table in Markdown, with a line on how to read it."""
    return (markdown_table(summary_display(summary, varying)) + "\n" + SUMMARY_NOTE
            + _left_out(excluded))


def stability_markdown(summary: pd.DataFrame, varying: Sequence[str] = (),
                       excluded: Sequence[str] = ()) -> str:
    """Failures and spread per configuration in Markdown, with how to read them."""
    return (markdown_table(stability_display(summary, varying)) + "\n" + STABILITY_NOTE
            + _left_out(excluded))


def verdict_markdown(verdicts: pd.DataFrame, varying: Sequence[str] = ()) -> str:
    """The verdict table in Markdown, with the rule behind the words."""
    return markdown_table(verdict_display(verdicts, varying)) + "\n" + VERDICT_NOTE


def write_summary(summary: pd.DataFrame, out_dir: Path, varying: Sequence[str] = (),
                  excluded: Sequence[str] = ()) -> dict[str, Path]:
    """summary.csv (fractions), summary.md and summary.tex (x100); stability.md and .tex."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in (
        "summary.csv", "summary.md", "summary.tex", "stability.md", "stability.tex")}
    summary.to_csv(paths["summary.csv"], index=False)
    paths["summary.md"].write_text(summary_markdown(summary, varying, excluded), "utf-8")
    paths["summary.tex"].write_text(latex_table(summary_display(summary, varying)), "utf-8")
    paths["stability.md"].write_text(stability_markdown(summary, varying, excluded), "utf-8")
    paths["stability.tex"].write_text(latex_table(stability_display(summary, varying)), "utf-8")
    return paths


def _write_csv_and_md(frame: pd.DataFrame, out_dir: Path, stem: str,
                      markdown: str) -> dict[str, Path]:
    """`<stem>.csv` from the frame and `<stem>.md` from the given Markdown."""
    paths = {f"{stem}.{ext}": Path(out_dir) / f"{stem}.{ext}" for ext in ("csv", "md")}
    frame.to_csv(paths[f"{stem}.csv"], index=False)
    paths[f"{stem}.md"].write_text(markdown, encoding="utf-8")
    return paths


def write_verdicts(verdicts: pd.DataFrame, out_dir: Path, varying: Sequence[str] = ()
                   ) -> dict[str, Path]:
    """verdict.csv (fractions, p-values, the word per test) and verdict.md."""
    return _write_csv_and_md(verdicts, out_dir, "verdict", verdict_markdown(verdicts, varying))


def write_paired(paired: pd.DataFrame, out_dir: Path, varying: Sequence[str] = ()
                 ) -> dict[str, Path]:
    """paired.csv (fractions) and paired.md (differences x100)."""
    note = (
        f"Each stabilizer minus `{REFERENCE_STABILIZER}` on test (best dev checkpoint), over the "
        "seeds both completed; W/T/L = wins/ties/losses. Two-sided Wilcoxon signed-rank "
        "(zero differences dropped) and paired t-test. Below "
        f"{sample_size.wilcoxon_min(ALPHA)} non-zero differences the Wilcoxon p cannot go under "
        f"{ALPHA}, and the t-test needs {sample_size.TTEST_PAIRS} pairs whose differences are "
        "not all equal: below, the cell says why instead of a p.\n"
    )
    return _write_csv_and_md(paired, out_dir, "paired",
                             markdown_table(paired_display(paired, varying)) + "\n" + note)


def write_expected_max(table: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """expected_max.csv: expected best dev score over k runs, per configuration."""
    path = Path(out_dir) / "expected_max.csv"
    table.to_csv(path, index=False)
    return {"expected_max.csv": path}


def write_blurb(blurb: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """blurb.csv (fractions) and blurb.md (x100), measured beside published."""
    out_dir = Path(out_dir)
    paths = {"blurb.csv": out_dir / "blurb.csv", "blurb.md": out_dir / "blurb.md"}
    blurb.to_csv(paths["blurb.csv"], index=False)
    paths["blurb.md"].write_text(markdown_table(blurb_display(blurb)), encoding="utf-8")
    return paths
