"""docs/study.md stands on the committed runs: the report regenerated from docs/study/runs gives
the tables the doc quotes and the files committed under docs/study/report, and the plain
Trainer baseline's table is recomputed from its committed results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from blurbtune.report.build import build_report

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# scripts/study_doc.py writes the blocks of docs/study.md; the test reads them with its pattern.
STUDY_DOC = _load(ROOT / "scripts" / "study_doc.py")
STUDY, DOC = STUDY_DOC.STUDY, STUDY_DOC.DOC

pytestmark = pytest.mark.skipif(not (STUDY / "runs").is_dir(), reason="docs/study/runs absent")


def _table(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study-report")
    build_report([STUDY / "runs"], out, reference_lr=STUDY_DOC.LR)
    return out


@pytest.fixture(scope="module")
def regenerated_gpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweeps = STUDY_DOC.gpu_sweeps()
    if not sweeps:
        pytest.skip("docs/study/gpu has no runs")
    out = tmp_path_factory.mktemp("study-gpu-report")
    build_report(sweeps, out)
    return out


def _trainer_summary() -> str:
    return STUDY_DOC.trainer_summary()


def test_doc_tables_are_the_regenerated_report(regenerated: Path, regenerated_gpu: Path) -> None:
    blocks = [(m[2], m[3], m[4]) for m in STUDY_DOC.BLOCK.finditer(DOC.read_text())]
    assert {name for kind, name, _ in blocks if kind == "report"} >= {"stability.md",
                                                                       "verdict.md"}
    assert {kind for kind, _, _ in blocks} >= {"gpu-report", "devices", "crosstask", "lr-pilot"}
    made = STUDY_DOC.blocks(regenerated, regenerated_gpu)
    for kind, name, body in blocks:
        expected = made[kind](name)
        assert _table(body) == _table(expected), f"docs/study.md's {kind} block {name} is stale"


def test_committed_report_is_current(regenerated: Path) -> None:
    for name in ("summary.md", "stability.md", "verdict.md", "paired.md"):
        assert (STUDY / "report" / name).read_text() == (regenerated / name).read_text(), name
    plots = {p.name for p in (regenerated / "plots").glob("*.png")}
    assert {p.name for p in (STUDY / "report" / "plots").glob("*.png")} == plots
    assert any(name.startswith("dev_curves_") for name in plots)
    assert any(name.startswith("grad_norm_early_") for name in plots)


def test_committed_gpu_report_is_current(regenerated_gpu: Path) -> None:
    for name in ("summary.md", "stability.md", "verdict.md", "paired.md"):
        assert (STUDY / "gpu" / "report" / name).read_text() == \
            (regenerated_gpu / name).read_text(), name


def _gpu_scores(folder: str, stabilizer: str) -> dict[int, float]:
    import json

    out = {}
    for path in (STUDY / "gpu" / folder).glob("*/results.json"):
        r = json.loads(path.read_text())
        name = r["stabilizer"] if isinstance(r["stabilizer"], str) else "+".join(r["stabilizer"])
        if name == stabilizer and r["status"] == "completed":
            out[r["seed"]] = 100 * r["test"]["best"]
    return out


def test_devices_table_against_scipy_on_the_runs_read_directly() -> None:
    """BIOSSES `none`, CPU against GPU: the three tests recomputed from each results.json."""
    import json

    from scipy import stats

    if not (STUDY / "gpu" / "biosses").is_dir():
        pytest.skip("docs/study/gpu/biosses absent")
    cpu = {}
    for path in (STUDY / "runs").glob("*/results.json"):
        r = json.loads(path.read_text())
        if r["stabilizer"] == "none" and r["lr"] == STUDY_DOC.LR and r["status"] == "completed":
            cpu[r["seed"]] = 100 * r["test"]["best"]
    gpu = _gpu_scores("biosses", "none")
    x, y = np.array(list(cpu.values())), np.array(list(gpu.values()))
    row = next(line for line in _table(DOC.read_text()) if line.startswith("| none | 10 / 10 |"))
    assert f"| {x.mean():.2f} ± {x.std(ddof=1):.2f} | {y.mean():.2f} ± {y.std(ddof=1):.2f} |" in row
    assert f"p={stats.ttest_ind(x, y, equal_var=False).pvalue:.3f}" in row
    assert f"p={stats.ks_2samp(x, y).pvalue:.3f}" in row
    assert f"p={stats.levene(x, y, center='median').pvalue:.3f}" in row
    diff = np.median([abs(cpu[s] - gpu[s]) for s in cpu])
    assert row.endswith(f"| {diff:.2f} | 0/10 |")


def test_crosstask_gad_cells_against_a_paired_t_test() -> None:
    from scipy import stats

    if not (STUDY / "gpu" / "gad").is_dir():
        pytest.skip("docs/study/gpu/gad absent")
    none = _gpu_scores("gad", "none")
    lines = _table(DOC.read_text())
    at = next(i for i, line in enumerate(lines) if line.startswith("| stabilizer | BIOSSES, CPU"))
    column = [c.strip() for c in lines[at].split("|")].index("GAD")
    for name in ("freeze_lower", "llrd", "reinit_top"):
        other = _gpu_scores("gad", name)
        seeds = sorted(none)
        diff = np.array([other[s] - none[s] for s in seeds])
        p = stats.ttest_rel([other[s] for s in seeds], [none[s] for s in seeds]).pvalue
        row = next(line for line in lines[at:] if line.startswith(f"| `{name}` |"))
        cell = [c.strip() for c in row.split("|")][column]
        assert cell.endswith(f": {diff.mean():+.1f} "
                             f"({'p<0.001' if p < 0.001 else f'p={p:.3f}'}), n={len(seeds)}")


def test_trainer_summary_against_numpy() -> None:
    import json

    results = [json.loads(p.read_text()) for p in (STUDY / "trainer").glob("*/trainer_result.json")]
    scores = np.array([r["test"] for r in results])
    last = _table(_trainer_summary())[-1]
    assert f"n={len(results)}" in last
    assert f"{100 * scores.mean():.2f} ± {100 * scores.std(ddof=1):.2f}" in last
    # Failed: constant predictions, or no better than the constant predictor (as the report).
    for r in results:
        assert r["failed"] == (r["collapsed_test"] or r["test"] <= r["baseline_test"])


def test_selection_table_against_the_runs_read_directly() -> None:
    """The selection block's numbers for `none`, recomputed here from each results.json with
    numpy and scipy: best-on-dev and last-epoch test means, their paired t-test, and the best
    test epoch over the runs that recorded test at every epoch."""
    import json

    from scipy import stats

    runs = [json.loads(p.read_text()) for p in (STUDY / "runs").glob("*/results.json")]
    mine = [r for r in runs if r["stabilizer"] == "none" and r["lr"] == STUDY_DOC.LR
            and r["status"] == "completed"]
    best = np.array([r["test"]["best"] for r in mine])
    last = np.array([r["test"]["last"] for r in mine])
    oracle = [max(h["test"] for h in r["history"]) for r in mine
              if all("test" in h for h in r["history"])]
    p = stats.ttest_rel(best, last).pvalue
    row = next(line for line in _table(DOC.read_text())
               if line.startswith(f"| none | {STUDY_DOC.LR:g} | "))
    assert row.startswith(f"| none | {STUDY_DOC.LR:g} | {len(mine)} | {100 * best.mean():.2f} ± "
                          f"{100 * best.std(ddof=1):.2f} | {100 * last.mean():.2f} ± ")
    assert f"(p={p:.3f})" in row
    if oracle:
        assert f"| {len(oracle)} | {100 * np.mean(oracle):.2f} ± " in row
