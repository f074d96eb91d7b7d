"""Write the report's tables: CSV with raw fractions, Markdown and LaTeX with scores x100."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from blurbtune.report.stats import BOOTSTRAP_METHOD, CONFIDENCE, REFERENCE_STABILIZER

DIGITS = 2
MISSING = "-"


def x100(value: Any, digits: int = DIGITS) -> str:
    """A fraction shown as BLURB shows scores: 0.8123 -> "81.23"."""
    return MISSING if pd.isna(value) else f"{100 * float(value):.{digits}f}"


def mean_std(mean: Any, std: Any, digits: int = DIGITS) -> str:
    """Mean and spread as "81.23 ± 1.05", or just the mean when there is no spread."""
    if pd.isna(std):
        return x100(mean, digits)
    return f"{x100(mean, digits)} ± {x100(std, digits)}"


def number(value: Any) -> str:
    """A hyperparameter for display: 3e-05, 16, or "-"."""
    if pd.isna(value):
        return MISSING
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def p_value(value: Any) -> str:
    return MISSING if pd.isna(value) else f"{float(value):.3f}"


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings, one column per thing a reader compares."""
    show_knobs = bool(summary["knobs"].astype(bool).any()) if len(summary) else False
    show_published = "published_test" in summary and summary["published_test"].notna().any()
    rows = []
    for _, row in summary.iterrows():
        out = {
            "Model": row["model"],
            "Task": row["task"],
            "Stabilizer": row["stabilizer"],
        }
        if show_knobs:
            out["Knobs"] = row["knobs"] or MISSING
        out |= {
            "lr": number(row["lr"]),
            "bs": number(row["batch_size"]),
            "n/runs": f"{row['n']}/{row['runs']}",
            "Test best": mean_std(row["test_best_mean"], row["test_best_std"]),
            "Median [min, max]": (
                MISSING
                if pd.isna(row["test_best_median"])
                else f"{x100(row['test_best_median'])} "
                f"[{x100(row['test_best_min'])}, {x100(row['test_best_max'])}]"
            ),
            f"{CONFIDENCE:.0%} CI": (
                MISSING
                if pd.isna(row["test_best_ci_low"])
                else f"[{x100(row['test_best_ci_low'])}, {x100(row['test_best_ci_high'])}]"
            ),
            "Test last": mean_std(row["test_last_mean"], row["test_last_std"]),
            "Dev best": mean_std(row["dev_best_mean"], row["dev_best_std"]),
            "Degenerate": str(row["degenerate"]),
        }
        if show_published:
            out["Published"] = x100(row["published_test"])
        rows.append(out)
    return pd.DataFrame(rows)


def paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired comparisons as strings."""
    rows = []
    for _, row in paired.iterrows():
        rows.append(
            {
                "Model": row["model"],
                "Task": row["task"],
                "Stabilizer": row["stabilizer"],
                "Knobs": row["knobs"] or MISSING,
                "lr": number(row["lr"]),
                "bs": number(row["batch_size"]),
                "n": str(row["n"]),
                "Mean diff": f"{100 * row['mean_diff']:+.{DIGITS}f}",
                "W/T/L": f"{row['wins']}/{row['ties']}/{row['losses']}",
                "Wilcoxon p": p_value(row["wilcoxon_p"]),
                "t-test p": p_value(row["ttest_p"]),
            }
        )
    return pd.DataFrame(rows)


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


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary table in Markdown, with a line on how to read it."""
    note = (
        "Scores x100 over completed runs: mean ± sample std. "
        f"CI: {CONFIDENCE:.0%} {BOOTSTRAP_METHOD} bootstrap of the mean test score. "
        "Degenerate: completed runs no better than the constant predictor on test, "
        "or with constant test predictions (they stay in the means).\n"
    )
    return markdown_table(summary_display(summary)) + "\n" + note


def write_summary(summary: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """summary.csv (fractions), summary.md and summary.tex (x100)."""
    out_dir = Path(out_dir)
    display = summary_display(summary)
    paths = {
        "summary.csv": out_dir / "summary.csv",
        "summary.md": out_dir / "summary.md",
        "summary.tex": out_dir / "summary.tex",
    }
    summary.to_csv(paths["summary.csv"], index=False)
    paths["summary.md"].write_text(summary_markdown(summary), encoding="utf-8")
    paths["summary.tex"].write_text(latex_table(display), encoding="utf-8")
    return paths


def write_paired(paired: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """paired.csv (fractions) and paired.md (differences x100)."""
    out_dir = Path(out_dir)
    paths = {"paired.csv": out_dir / "paired.csv", "paired.md": out_dir / "paired.md"}
    paired.to_csv(paths["paired.csv"], index=False)
    note = (
        f"Each stabilizer minus `{REFERENCE_STABILIZER}` on test (best dev checkpoint), over the "
        "seeds both completed; W/T/L = wins/ties/losses. Two-sided Wilcoxon signed-rank "
        "(zero differences dropped) and paired t-test. With n <= 5 pairs the Wilcoxon p "
        "cannot go below 0.06.\n"
    )
    paths["paired.md"].write_text(
        markdown_table(paired_display(paired)) + "\n" + note, encoding="utf-8"
    )
    return paths


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
