"""A report folder holds one whole report, never a mix of two, and never a user's own files
replaced: two reports on one `--out`, a file or a foreign folder as `--out`."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_runs import write_run

from blurbtune.report import build, tables
from blurbtune.report.cli import main
from blurbtune.report.folder import REPORT_FILES, publish


def sweep(root: Path, task: str) -> Path:
    for stabilizer in ("none", "llrd"):
        for seed in range(3):
            score = 0.5 + 0.01 * seed + (0.1 if stabilizer == "llrd" else 0.0)
            write_run(root, task=task, stabilizer=stabilizer, seed=seed, test=(score, score),
                      dev=(score, score))
    return root


def tasks_in(folder: Path) -> set[str]:
    """The tasks that the report's files speak of (file contents and plot names)."""
    text = " ".join(p.read_text() for p in folder.rglob("*") if p.suffix in (".csv", ".md"))
    text += " ".join(p.name for p in folder.rglob("*.png"))
    return {task for task in ("biosses", "chemprot") if task in text}


def test_a_report_written_during_another_leaves_one_whole_report(tmp_path, monkeypatch):
    """Report B runs to completion while report A is half written, on the same --out: the
    old code left A's expected_max.csv and plots beside B's runs.csv and summaries."""
    a, b = sweep(tmp_path / "a", "biosses"), sweep(tmp_path / "b", "chemprot")
    out = tmp_path / "report"
    real = tables.write_expected_max
    interleaved = []

    def write_expected_max(*args, **kwargs):
        if not interleaved:
            interleaved.append(True)
            build.build_report([b], out)  # B, whole, in the middle of A
            assert tasks_in(out) == {"chemprot"}
        return real(*args, **kwargs)

    monkeypatch.setattr(tables, "write_expected_max", write_expected_max)
    report = build.build_report([a], out)
    assert interleaved
    assert tasks_in(out) == {"biosses"}  # A, whole: it finished last
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {name.split("/")[0] for name in report.written})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_every_file_a_report_writes_is_known(tmp_path):
    """folder.REPORT_FILES decides what may be replaced: it must name every table."""
    report = build.build_report([sweep(tmp_path / "a", "biosses")], tmp_path / "report")
    tables_written = {name for name in report.written if "/" not in name}
    assert tables_written <= REPORT_FILES
    assert {"blurb.csv", "blurb.md"} <= REPORT_FILES  # written only for BLURB tasks


def test_a_report_replaces_an_older_report(tmp_path):
    out = tmp_path / "report"
    build.build_report([sweep(tmp_path / "b", "chemprot")], out)
    (out / "plots" / "scores_gone_minilm.png").write_bytes(b"\x89PNG")  # an old plot
    build.build_report([sweep(tmp_path / "a", "biosses")], out)
    assert tasks_in(out) == {"biosses"}
    assert not (out / "plots" / "scores_gone_minilm.png").exists()


def test_publish_over_an_empty_folder_and_over_none(tmp_path):
    for out in (tmp_path / "empty", tmp_path / "absent"):
        if out.name == "empty":
            out.mkdir()
        tmp = tmp_path / f".{out.name}.tmp"
        tmp.mkdir()
        (tmp / "runs.csv").write_text("x\n")
        publish(tmp, out)
        assert (out / "runs.csv").read_text() == "x\n" and not tmp.exists()


@pytest.mark.parametrize("kind", ["file", "folder with notes", "the sweep itself"])
def test_an_out_that_is_not_a_report_is_refused_and_left_alone(tmp_path, capsys, kind):
    root = sweep(tmp_path / "a", "biosses")
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
        expected = f"--out {out}: is a file; expected a folder for the report"
    elif kind == "folder with notes":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "summary.md").write_text("an old table")
        expected = f"--out {out}: holds notes.txt, which no report writes"
    else:
        out = root
        expected = f"--out {out}: holds minilm, which no report writes"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main([str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"blurbtune report: error: {expected}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_file_given_as_sweep(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "notes.txt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"blurbtune report: error: {tmp_path / 'notes.txt'}: is a file; expected a sweep folder "
        "or a results.json")


def test_a_report_that_cannot_be_written_leaves_the_old_one(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "report"
    build.build_report([sweep(tmp_path / "b", "chemprot")], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tables, "write_expected_max", full)
    assert main([str(sweep(tmp_path / "a", "biosses")), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"blurbtune report: error: --out {out}: the report could not be written (No space left "
        "on device); nothing was changed there")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
