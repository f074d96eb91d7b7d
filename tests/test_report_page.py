"""report.html in a real browser (Debian's chromium through Playwright), and what the report
names instead of dropping: runs without a usable score, a bad --reference-lr, a configuration
with nothing to compare with, configurations that mix code versions; and the report package's
imports form no circle."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import statistics
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest
from report_runs import write_run

from blurbtune.report.cli import main
from blurbtune.report.page import RUN_COLUMNS, RUNS_TABLE

REPORT_PACKAGE = Path(__file__).resolve().parents[1] / "src" / "blurbtune" / "report"
NONE = [0.60, 0.55, 0.70, 0.65]
LLRD = [0.72, 0.61, 0.75, 0.69]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _edit(folder: Path, change) -> None:
    path = folder / "results.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def failing_sweep(tmp_path: Path) -> dict:
    """none and llrd at seeds 0-3 (known test scores), llrd seed 4 with a NaN test.best,
    none seed 4 without dev scores, llrd seed 5 failed, none seed 5 diverged."""
    root = tmp_path / "sweep"
    for stabilizer, scores in (("none", NONE), ("llrd", LLRD)):
        for seed, score in enumerate(scores):
            write_run(root, stabilizer=stabilizer, seed=seed, test=(score, score),
                      dev=(score + 0.05, score))
    nan_run = write_run(root, stabilizer="llrd", seed=4, test=(0.9, 0.9))
    _edit(nan_run, lambda d: d["test"].update(best=float("nan")))
    no_dev = write_run(root, stabilizer="none", seed=4, test=(0.1, 0.1))
    _edit(no_dev, lambda d: d.pop("dev"))
    write_run(root, stabilizer="llrd", seed=5, status="failed", test=None, dev=None,
              error="CUDA out of memory")
    write_run(root, stabilizer="none", seed=5, status="diverged", test=(0.05, 0.01),
              dev=(0.04, 0.02), error="loss is NaN")
    return {"root": root, "nan": nan_run, "no_dev": no_dev}


def test_runs_without_a_usable_score_are_named_and_left_out(failing_sweep: dict, tmp_path: Path,
                                                            capsys) -> None:
    """A NaN test.best or a missing dev leaves the run out of every statistic (the same n in
    every table), named with its file and reason on the console and on the page."""
    out = tmp_path / "report"
    assert main([str(failing_sweep["root"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    nan_file, no_dev_file = (failing_sweep[k] / "results.json" for k in ("nan", "no_dev"))
    assert f"{nan_file}: `test.best` is nan" in err
    assert f"{no_dev_file}: no `dev` scores" in err
    summary = pd.read_csv(out / "summary.csv").set_index("stabilizer")
    for stabilizer, scores in (("none", NONE), ("llrd", LLRD)):
        row = summary.loc[stabilizer]
        assert (row["n"], row["completed"], row["runs"]) == (4, 4, 5)  # + 1 failed/diverged
        assert row["test_best_mean"] == pytest.approx(statistics.mean(scores))
    verdict = pd.read_csv(out / "verdict.csv").iloc[0]
    assert verdict["n_pairs"] == 4 and verdict["n_std"] == 4 and verdict["n_std_ref"] == 4
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs.loc[runs["left_out"].notna(), "path"]) == {str(nan_file), str(no_dev_file)}
    page = (out / "report.html").read_text()
    assert f"{nan_file}: `test.best` is nan" in page


@pytest.mark.parametrize("lr", ["0", "-1e-4", "nan"])
def test_reference_lr_not_positive_is_refused(failing_sweep: dict, tmp_path: Path, lr: str,
                                              capsys) -> None:
    out = tmp_path / "report"
    assert main([str(failing_sweep["root"]), "--out", str(out), f"--reference-lr={lr}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"blurbtune report: error: --reference-lr {float(lr)}: expected a learning "
                   "rate > 0"]
    assert not out.exists()


def test_a_configuration_without_reference_says_so(tmp_path: Path) -> None:
    """llrd at an lr where no `none` ran, with a --reference-lr that matches no `none` either:
    its verdict row says it was not compared and why, and a note names the lr."""
    for seed in range(3):
        write_run(tmp_path / "s", stabilizer="none", seed=seed, lr=1e-4)
        write_run(tmp_path / "s", stabilizer="llrd", seed=seed, lr=1e-3)
    assert main([str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--reference-lr", "5e-5"]) == 0
    verdict = pd.read_csv(tmp_path / "r" / "verdict.csv")
    [row] = verdict.itertuples()
    assert row.stabilizer == "llrd" and pd.isna(row.ref_config)
    assert row.verdict == ("not compared: no `none` run in an otherwise identical configuration, "
                           "at its own lr or at --reference-lr 5e-05")
    assert row.verdict in (tmp_path / "r" / "verdict.md").read_text()


def _provenance(folder: Path, **sections: dict) -> None:
    (folder / "provenance.json").write_text(json.dumps(sections))


def test_mixed_versions_are_noted_in_the_row(tmp_path: Path) -> None:
    """none's runs were made with two torch versions: its row says which, with counts; llrd's
    runs all used one source hash but one run does not record it (unknown, not a difference)."""
    for seed in range(4):
        none = write_run(tmp_path / "s", stabilizer="none", seed=seed)
        _provenance(none, torch={"version": "2.12.0" if seed < 1 else "2.13.0",
                                 "devices": ["cpu"]}, code={"source_sha256": "a" * 64})
        llrd = write_run(tmp_path / "s", stabilizer="llrd", seed=seed)
        code = {"source_sha256": "a" * 64} if seed else {"commit": "0" * 40}
        _provenance(llrd, torch={"version": "2.13.0", "devices": ["cpu"]}, code=code)
    assert main([str(tmp_path / "s"), "--out", str(tmp_path / "r")]) == 0
    summary = pd.read_csv(tmp_path / "r" / "summary.csv").set_index("stabilizer")
    assert summary.loc["none", "versions_note"] == "mixed: torch 2.12.0 (1 runs), 2.13.0 (3 runs)"
    assert pd.isna(summary.loc["llrd", "versions_note"])
    for name in ("summary.md", "stability.md", "report.html"):
        assert "mixed: torch 2.12.0 (1 runs), 2.13.0 (3 runs)" in (tmp_path / "r" / name
                                                                   ).read_text(), name


def _imports(path: Path) -> set[str]:
    """The blurbtune.report modules `path` imports, at any depth, except for type checking."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "blurbtune.report":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("blurbtune.report."):
                found.add(node.module.split(".")[2])
    return found


def test_report_modules_import_no_circle() -> None:
    """identity -> tables -> power -> stats -> identity was a circle held by constants; they
    live in report/constants.py, which imports no other report module."""
    graph = {p.stem: _imports(p) - {p.stem} for p in REPORT_PACKAGE.glob("*.py")}
    assert graph["constants"] == set()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for other in graph.get(module, ()):
            visit(other, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and
                 Path(p).is_file()), None)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    executable = _chromium()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _column(page, name: str) -> list[str]:
    index = RUN_COLUMNS.index(name)
    return page.eval_on_selector_all(
        f"#{RUNS_TABLE} tbody tr", f"rows => rows.map(r => r.cells[{index}].innerText)")


def test_page_in_chromium(failing_sweep: dict, tmp_path: Path, browser) -> None:
    """The page renders offline with no console error; the verdict cells read verdict.csv's
    values; sorting the runs table by test score orders it; a configuration pane hides the other
    configurations; a screenshot is saved."""
    from playwright.sync_api import expect  # the browser fixture skips without playwright

    out = tmp_path / "report"
    assert main([str(failing_sweep["root"]), "--out", str(out)]) == 0
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "report.html").as_uri())
    page.wait_for_selector(f"#{RUNS_TABLE} tbody tr td")
    page.wait_for_selector(".bk-Canvas, .bk-Figure, div.bk-root, [data-root-id]",
                           state="attached")
    assert problems == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []

    csv = pd.read_csv(out / "verdict.csv")
    header = page.eval_on_selector_all("#verdict thead th", "cells => cells.map(c => c.innerText)")
    cells = page.eval_on_selector_all(
        "#verdict tbody tr", "rows => rows.map(r => Array.from(r.cells, c => c.innerText))")
    assert len(cells) == len(csv)
    for row, (_, expected) in zip(cells, csv.iterrows(), strict=True):
        shown = dict(zip(header, row, strict=True))
        assert shown["Stabilizer"] == expected["stabilizer"]
        assert shown["Verdict"] == expected["verdict"]
        assert shown["Δ mean (x100)"].startswith(f"{100 * expected['mean_diff']:+.2f} (p=")
        assert f"p={expected['ttest_p']:.3f}" in shown["Δ mean (x100)"]

    header = page.locator(f"#{RUNS_TABLE} thead th", has_text="test (x100)")
    sort = header.locator(".dt-column-order")  # the header's text is selectable; its arrows sort
    page.select_option(f"select[aria-controls='{RUNS_TABLE}']", "-1")  # every run on one page
    sort.click()
    expect(header).to_have_attribute("aria-sort", "ascending")
    scores = [float(v) for v in _column(page, "test (x100)") if v.strip()]
    runs = pd.read_csv(out / "runs.csv")
    expected = sorted(round(100 * v, 2) for v in runs["test_best"] if not math.isnan(v))
    assert scores == expected
    sort.click()
    expect(header).to_have_attribute("aria-sort", "descending")
    assert [float(v) for v in _column(page, "test (x100)") if v.strip()] == expected[::-1]

    labels = set(_column(page, "configuration"))
    llrd = next(label for label in labels if "/ llrd (" in label)
    page.locator("div.dtsp-searchPane tbody tr", has_text="/ llrd (").first.click()
    page.wait_for_function(f"document.querySelectorAll('#{RUNS_TABLE} tbody tr').length == "
                           f"{int((runs['stabilizer'] == 'llrd').sum())}")
    assert set(_column(page, "configuration")) == {llrd}
    links = page.eval_on_selector_all(f"#{RUNS_TABLE} tbody a", "as => as.map(a => a.href)")
    assert links and all(Path(unquote(link.removeprefix("file://"))).is_dir() for link in links)

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("BLURBTUNE_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["BLURBTUNE_SCREENSHOTS"]) / "report-failing-sweep.png")


def test_set_plots_are_drawn_for_the_sets_with_most_failures() -> None:
    """Above MAX_SET_PLOTS sets, the dev-curve and gradient plots go to the sets with the most
    failed runs (in their order), and a note says how many were not drawn."""
    from blurbtune.report import plots

    failures = [0, 3, 1, 5, 2, 4]
    sets = [(f"s{i}", "t", pd.DataFrame({"failure": [True] * k + [False]}))
            for i, k in enumerate(failures)]
    kept, note = plots._looked_at(sets, "Dev curves")
    ranked = sorted(range(len(failures)), key=lambda i: -failures[i])[:plots.MAX_SET_PLOTS]
    assert [stem for stem, _, _ in kept] == [f"s{i}" for i in sorted(ranked)]
    assert note.startswith(f"Dev curves: drawn for the {plots.MAX_SET_PLOTS} of 6 sets")
    assert plots._looked_at(sets[:plots.MAX_SET_PLOTS], "x") == (sets[:plots.MAX_SET_PLOTS], None)
