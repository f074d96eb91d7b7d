"""blurbtune report on fabricated sweeps whose numbers are known."""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_runs import WEIGHTS_A, WEIGHTS_B, write_run
from scipy import stats as sps

from blurbtune.report import make_report
from blurbtune.report.cli import main
from blurbtune.report.collect import collect
from blurbtune.report.stats import (
    bootstrap_ci,
    expected_max,
    expected_max_std,
    paired_test,
)

BIOSSES = {  # stabilizer -> test_best per seed 0..4
    "none": [0.70, 0.74, 0.78, 0.72, 0.76],
    "llrd": [0.73, 0.74, 0.80, 0.71, 0.79],
    "llrd+reinit_top": [0.75, 0.77, 0.76, 0.74, 0.78],
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """biosses: 3 stabilizers x 5 seeds (+1 failed, +1 diverged llrd run);
    chemprot: 3 completed seeds (2 degenerate) and one still running."""
    root = tmp_path / "sweep"
    for stabilizer, scores in BIOSSES.items():
        for seed, score in enumerate(scores):
            write_run(
                root,
                stabilizer=stabilizer,
                seed=seed,
                test=(score, score - 0.01 * (seed % 3)),
                dev=(score + 0.05 + 0.01 * seed, score + 0.04),
            )
    write_run(root, stabilizer="llrd", seed=5, status="failed", test=None, dev=None,
              error="CUDA out of memory")  # fmt: skip
    write_run(root, stabilizer="llrd", seed=6, status="diverged", test=(0.05, 0.01),
              dev=(0.04, 0.02), error="loss is NaN")  # fmt: skip
    write_run(root, task="chemprot", seed=0, test=(0.45, 0.44), dev=(0.47, 0.46))
    write_run(root, task="chemprot", seed=1, test=(0.0, 0.0), dev=(0.0, 0.0))
    write_run(root, task="chemprot", seed=2, test=(0.30, 0.30), dev=(0.31, 0.3),
              collapsed_test=True)  # fmt: skip
    write_run(root, task="chemprot", seed=3, status="running", test=None, dev=None)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def raw_results(root: Path) -> list[dict]:
    """The results.json files, read without the report's code."""
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


def test_summary_matches_independent_recomputation(sweep: Path, tmp_path: Path) -> None:
    written = make_report([sweep], tmp_path / "out")
    rows = read_csv(written["summary.csv"])
    results = raw_results(sweep)
    assert len(rows) == 4
    for row in rows:
        mine = [r for r in results
                if (r["model"], r["task"], r["stabilizer"]) == (row["model"], row["task"],
                                                                 row["stabilizer"])]  # fmt: skip
        done = [r for r in mine if r["status"] == "completed"]
        for split, which in (("test", "best"), ("test", "last"), ("dev", "best")):
            values = [r[split][which] for r in done]
            column = f"{split}_{which}"
            assert float(row[f"{column}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(row[f"{column}_std"]) == pytest.approx(statistics.stdev(values))
        best = [r["test"]["best"] for r in done]
        assert float(row["test_best_median"]) == pytest.approx(statistics.median(best))
        assert float(row["test_best_min"]) == pytest.approx(min(best))
        assert float(row["test_best_max"]) == pytest.approx(max(best))
        assert int(row["runs"]) == len(mine)
        assert int(row["completed"]) == int(row["n"]) == len(done)
        # at most 5 runs a configuration: too few for a 95% bootstrap interval of the mean
        assert row["test_best_ci_low"] == row["test_best_ci_high"] == ""
        assert row["test_best_ci_note"] == f"n too small: {len(best)}, needs ≥6"


def test_failed_runs_are_counted_not_averaged(sweep: Path, tmp_path: Path) -> None:
    summary = pd.read_csv(make_report([sweep], tmp_path / "out")["summary.csv"])
    llrd = summary[(summary.task == "biosses") & (summary.stabilizer == "llrd")].iloc[0]
    assert (llrd.runs, llrd.completed, llrd.failed, llrd.running) == (7, 5, 2, 0)
    assert llrd.test_best_mean == pytest.approx(np.mean(BIOSSES["llrd"]))  # not the 0.05
    assert llrd.knobs == "llrd.decay=0.9"
    chemprot = summary[summary.task == "chemprot"].iloc[0]
    assert (chemprot.runs, chemprot.completed, chemprot.failed, chemprot.running) == (4, 3, 0, 1)


def test_degenerate_runs_are_counted_and_shouted(sweep: Path, tmp_path: Path, capsys) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    counts = dict(zip(summary.task + "/" + summary.stabilizer, summary.degenerate, strict=True))
    assert counts == {"biosses/llrd": 0, "biosses/llrd+reinit_top": 0, "biosses/none": 0,
                      "chemprot/none": 2}  # fmt: skip
    err = capsys.readouterr().err
    assert "2 DEGENERATE RUN(S)" in err
    assert "chemprot / none (lr=3e-05, bs=16) seed 1: test 0.00 <= constant predictor 0.00" in err
    assert "seed 2: test predictions (nearly) constant" in err


def test_partial_sweep_is_explained(sweep: Path, tmp_path: Path, capsys) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "chemprot / none (lr=3e-05, bs=16): 3 of 5 seeds completed; missing seed 3, 4" in err
    assert "Still running (1)" in err and "chemprot / none (lr=3e-05, bs=16) seed 3" in err
    assert "Failed or diverged runs (2)" in err
    assert "seed 5: failed: CUDA out of memory" in err
    assert "seed 6: diverged: loss is NaN" in err
    assert "biosses / none (lr=3e-05, bs=16): " not in err  # complete groups stay quiet


def test_cli_prints_table_and_written_files(sweep: Path, capsys) -> None:
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    none = BIOSSES["none"]
    assert f"{100 * statistics.mean(none):.2f} ± {100 * statistics.stdev(none):.2f}" in out
    assert "| minilm | biosses | llrd+reinit_top |" in out
    written = sorted(p for p in (sweep / "report").rglob("*") if p.is_file())
    assert f"Wrote {len(written)} files to {sweep / 'report'}" in out
    for name in ("runs.csv", "summary.md", "summary.tex", "paired.md", "expected_max.csv"):
        assert (sweep / "report" / name).is_file()


def test_runs_csv_is_flat(sweep: Path, tmp_path: Path) -> None:
    runs = pd.read_csv(make_report([sweep], tmp_path / "out")["runs.csv"])
    assert len(runs) == 21
    for column in ("test_best", "test_last", "dev_best", "baseline_test", "collapsed_test",
                   "knob.llrd.decay", "knob.reinit.layers", "n_train"):  # fmt: skip
        assert column in runs.columns
    combo = runs[runs.stabilizer == "llrd+reinit_top"]
    assert set(combo["knob.reinit.layers"]) == {1}
    assert runs[runs.stabilizer == "none"]["knob.llrd.decay"].isna().all()


def test_unset_lr_and_all_failed_config(tmp_path: Path, capsys) -> None:
    root = tmp_path / "sweep"
    for seed in (0, 1):
        write_run(root, seed=seed, lr=None, test=(0.6 + 0.1 * seed, 0.6))
        write_run(root, stabilizer="llrd", seed=seed, lr=None, test=(0.7 + 0.1 * seed, 0.6))
    write_run(root, stabilizer="freeze_lower", status="failed", test=None, dev=None, error="boom")
    assert main([str(root)]) == 0
    summary = pd.read_csv(root / "report" / "summary.csv")
    frozen = summary[summary.stabilizer == "freeze_lower"].iloc[0]
    assert (frozen.runs, frozen.completed, frozen.failed) == (1, 0, 1)
    assert np.isnan(frozen.test_best_mean)
    paired = pd.read_csv(root / "report" / "paired.csv")
    assert paired.iloc[0].stabilizer == "llrd" and np.isnan(paired.iloc[0].lr)
    assert paired.iloc[0].mean_diff == pytest.approx(0.1)
    assert "freeze_lower (lr=3e-05, bs=16): 0 of 2 seeds completed" in capsys.readouterr().err


def test_expected_max_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for values in ([0.3, 0.9, 0.5, 0.5], rng.uniform(size=5).tolist(), [0.7]):
        n = len(values)
        brute = [np.mean([max(draw) for draw in itertools.product(values, repeat=k)])
                 for k in range(1, n + 1)]  # fmt: skip
        brute_sq = [np.mean([max(draw) ** 2 for draw in itertools.product(values, repeat=k)])
                    for k in range(1, n + 1)]  # fmt: skip
        assert expected_max(values) == pytest.approx(brute)
        assert expected_max_std(values) == pytest.approx(
            np.sqrt(np.array(brute_sq) - np.array(brute) ** 2), abs=1e-7
        )
    assert expected_max([0.3, 0.9, 0.5], k_max=50)[-1] == pytest.approx(0.9)


def test_expected_max_against_simulation() -> None:
    values = np.array([0.61, 0.72, 0.55, 0.80, 0.64, 0.70])
    draws = np.random.default_rng(0).choice(values, size=(200_000, 4))
    assert expected_max(values)[3] == pytest.approx(draws.max(axis=1).mean(), abs=2e-3)


def test_expected_max_csv(sweep: Path, tmp_path: Path) -> None:
    table = pd.read_csv(make_report([sweep], tmp_path / "out")["expected_max.csv"])
    none = table[(table.task == "biosses") & (table.stabilizer == "none")]
    dev = [r["dev"]["best"] for r in raw_results(sweep)
           if r["task"] == "biosses" and r["stabilizer"] == "none"]  # fmt: skip
    assert none.k.tolist() == [1, 2, 3, 4, 5]
    assert none.expected_max.iloc[0] == pytest.approx(statistics.mean(dev))
    expected_two = np.mean([max(a, b) for a in dev for b in dev])
    assert none.expected_max.iloc[1] == pytest.approx(expected_two)


def test_paired_against_none(sweep: Path, tmp_path: Path) -> None:
    written = make_report([sweep], tmp_path / "out")
    paired = pd.read_csv(written["paired.csv"])
    assert set(paired.stabilizer) == {"llrd", "llrd+reinit_top"}  # chemprot has no stabilizer
    llrd = paired[paired.stabilizer == "llrd"].iloc[0]
    # by hand: +0.03, 0, +0.02, -0.01, +0.03 over seeds 0-4 (the failed seeds 5, 6 are unpaired)
    assert (llrd.n, llrd.wins, llrd.ties, llrd.losses) == (5, 3, 1, 1)
    assert llrd.mean_diff == pytest.approx(0.07 / 5)
    assert llrd.seeds == "0 1 2 3 4"
    treated, reference = BIOSSES["llrd"], BIOSSES["none"]
    # 4 non-zero differences: the Wilcoxon p could not go below 2/2^4 (test_report_sample_size)
    assert np.isnan(llrd.wilcoxon_p)
    assert llrd.wilcoxon_note == "n too small: 4 non-zero differences, needs ≥6"
    assert llrd.ttest_p == pytest.approx(sps.ttest_rel(treated, reference).pvalue)
    assert "| minilm | biosses | llrd | llrd.decay=0.9 |" in written["paired.md"].read_text()


def test_paired_test_edge_cases() -> None:
    same = paired_test([0.5, 0.6], [0.5, 0.6])
    assert (same["wins"], same["ties"], same["losses"]) == (0, 2, 0)
    assert np.isnan(same["wilcoxon_p"]) and np.isnan(same["ttest_p"])
    assert same["ttest_note"] == "all 2 differences equal, t undefined"
    assert np.isnan(paired_test([0.5], [0.4])["ttest_p"])


def test_bootstrap_ci_is_seeded() -> None:
    values = [0.70, 0.74, 0.78, 0.72, 0.76, 0.71]
    assert bootstrap_ci(values) == bootstrap_ci(values)
    assert bootstrap_ci([0.5] * 6) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_ci([0.5])))


def test_pngs_and_tex_are_written(sweep: Path, tmp_path: Path) -> None:
    written = make_report([sweep], tmp_path / "out")
    pngs = [name for name in written if name.endswith(".png")]
    assert sorted(pngs) == [
        "plots/expected_max_biosses_minilm.png",
        "plots/expected_max_chemprot_minilm.png",
        "plots/scores_biosses_minilm.png",
        "plots/scores_chemprot_minilm.png",
    ]
    for name in pngs:
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tex = written["summary.tex"].read_text()
    assert tex.startswith("\\begin{tabular}") and tex.rstrip().endswith("\\end{tabular}")
    assert "llrd+reinit\\_top" in tex and "$\\pm$" in tex


def test_malformed_results_are_reported(sweep: Path, tmp_path: Path, capsys) -> None:
    (sweep / "broken").mkdir()
    (sweep / "broken" / "results.json").write_text("{not json")
    (sweep / "listed").mkdir()
    (sweep / "listed" / "results.json").write_text("[1, 2]")
    (sweep / "taskless").mkdir()
    (sweep / "taskless" / "results.json").write_text('{"status": "completed", "model": "x"}')
    found = collect([sweep])
    assert len(found.runs) == 21
    reasons = {path.parent.name: reason for path, reason in found.errors}
    assert reasons["broken"].startswith("invalid JSON")
    assert reasons["listed"] == "expected a JSON object, got list"
    assert reasons["taskless"] == "missing keys: task"
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "Unreadable results.json (3)" in err
    assert f"{sweep / 'broken' / 'results.json'}: invalid JSON" in err


def test_folder_without_results_is_an_error(sweep: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(sweep), str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: no results.json found" in err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    (empty / "results.json").write_text("oops")
    assert main([str(empty)]) == 2
    assert "none of the results.json files could be read" in capsys.readouterr().err


BLURB_TASKS = ["bc5chem", "bc5disease", "ncbi_disease", "bc2gm", "jnlpba", "ebm_pico", "chemprot",
               "ddi", "gad", "biosses", "hoc", "pubmedqa", "bioasq"]  # fmt: skip


@pytest.fixture
def fake_blurb(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in for blurbtune.blurb: score = plain mean, published = task index + 50."""
    module = types.ModuleType("blurbtune.blurb")

    def score(scores: dict[str, float]) -> float:
        if set(scores) != set(BLURB_TASKS):
            raise ValueError("need all 13")
        return float(np.mean(list(scores.values())))

    def published_scores() -> pd.DataFrame:
        values = [50.0 + i for i in range(len(BLURB_TASKS))]
        return pd.DataFrame({"bert_uncased": values, "pubmedbert": values}, index=BLURB_TASKS)

    module.score, module.published_scores = score, published_scores
    monkeypatch.setitem(sys.modules, "blurbtune.blurb", module)
    return module


def test_blurb_score_and_published(fake_blurb, tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for i, task in enumerate(BLURB_TASKS):
        for seed in (0, 1):
            write_run(root, model="bert_base", task=task, seed=seed,
                      test=(0.5 + 0.01 * i + 0.02 * seed, 0.5), dev=(0.6, 0.6))  # fmt: skip
    # a worse-on-dev lr for biosses must not be the one scored
    write_run(root, model="bert_base", task="biosses", lr=1e-4, test=(0.99, 0.99), dev=(0.1, 0.1))
    written = make_report([root], tmp_path / "out")
    summary = pd.read_csv(written["summary.csv"])
    biosses = summary[(summary.task == "biosses") & (summary.lr == 3e-5)].iloc[0]
    assert biosses.published_test == pytest.approx(0.59)  # bert_base -> bert_uncased
    blurb = pd.read_csv(written["blurb.csv"])
    final = blurb[blurb.task == "BLURB"].iloc[0]
    assert final.test_mean == pytest.approx(np.mean([0.51 + 0.01 * i for i in range(13)]))
    assert final.published == pytest.approx(np.mean([0.50 + 0.01 * i for i in range(13)]))
    assert blurb[blurb.task == "biosses"].iloc[0].lr == 3e-5


def test_partial_blurb_has_no_score(fake_blurb, sweep: Path, tmp_path: Path) -> None:
    blurb = pd.read_csv(make_report([sweep], tmp_path / "out")["blurb.csv"])
    final = blurb[blurb.task == "BLURB"]
    assert len(final) == 3  # one per (model, stabilizer, knobs)
    assert final.test_mean.isna().all() and final.published.isna().all()  # minilm: no column
    none = final[final.stabilizer == "none"].iloc[0]
    assert none.note.startswith("2/13 tasks")


def test_blurb_section_skipped_without_module(monkeypatch, sweep: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "blurbtune.blurb", None)  # import raises ImportError
    assert main([str(sweep)]) == 0
    assert "BLURB score and published reference numbers skipped" in capsys.readouterr().out
    assert not (sweep / "report" / "blurb.csv").exists()


# ---------------------------------------------------------------- one group = one configuration


def summary_of(root: Path, out: Path) -> pd.DataFrame:
    return pd.read_csv(make_report([root], out)["summary.csv"])


def test_two_epoch_counts_in_one_folder_are_two_configurations(tmp_path: Path, capsys) -> None:
    """Two sweeps written to one folder, trainer.max_epochs=1 and =2, seeds 0 and 1 each."""
    root = tmp_path / "sweep"
    scores = {(1, 0): 0.50, (1, 1): 0.60, (2, 0): 0.70, (2, 1): 0.90}
    for (epochs, seed), score in scores.items():
        write_run(root, seed=seed, test=(score, score), config=[f"trainer.max_epochs={epochs}"],
                  folder=root / f"seed={seed},trainer.max_epochs={epochs}")
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert len(summary) == 2
    assert sorted(summary["trainer.max_epochs"]) == [1, 2]
    for _, row in summary.iterrows():
        mine = [s for (e, _), s in scores.items() if e == row["trainer.max_epochs"]]
        assert (row.runs, row.n) == (2, 2)
        assert row.test_best_mean == pytest.approx(statistics.mean(mine))
        assert row.test_best_std == pytest.approx(statistics.stdev(mine))
    for name in ("summary.md", "stability.md", "summary.tex"):
        assert "trainer.max_epochs" in (tmp_path / "out" / name).read_text().replace("\\_", "_")
    assert "| minilm | biosses | none | 3e-05 | 16 | 1 | 2/2 |" in out  # the column, console


def test_two_model_folders_are_two_models(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for name, weights in (("a", WEIGHTS_A), ("b", WEIGHTS_B)):
            write_run(root, seed=seed, test=(0.5 + 0.1 * seed, 0.5), config=[], weights=weights,
                      model_path=f"/models/{name}", folder=root / name / f"seed={seed}")
    summary = summary_of(root, tmp_path / "out")
    assert len(summary) == 2 and list(summary.runs) == [2, 2]
    assert set(summary["model (weights sha256[:8])"]) == {WEIGHTS_A[:8], WEIGHTS_B[:8]}
    assert set(summary["model_id"]) == {WEIGHTS_A, WEIGHTS_B}


def test_paths_workers_and_saving_do_not_split_a_configuration(tmp_path: Path) -> None:
    """Same weights and data at other paths, other worker counts, save_model: one group."""
    root = tmp_path / "sweep"
    write_run(root, seed=0, config=["data_dir=/data/one", "data.num_workers=0"],
              model_path="/models/here", folder=root / "a")
    write_run(root, seed=1, config=["data_dir=/data/two", "data.num_workers=4", "save_model=true",
                                    "data.cache_dir=/elsewhere", "name=other"],
              model_path="/models/there", folder=root / "b")
    summary = summary_of(root, tmp_path / "out")
    assert len(summary) == 1 and summary.runs.iloc[0] == 2
    assert "model (weights sha256[:8])" not in summary and "data.num_workers" not in summary


def test_a_setting_that_changes_numbers_splits(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    write_run(root, seed=0, config=[], folder=root / "a")
    write_run(root, seed=1, config=["optimizer.weight_decay=0.1"], folder=root / "b")
    summary = summary_of(root, tmp_path / "out")
    assert list(summary["optimizer.weight_decay"]) == [0.01, 0.1]


def test_stabilizer_groups_by_what_was_applied(tmp_path: Path) -> None:
    """A config that asked for something else (e.g. a stabilizer picked at run time) groups
    with the runs that applied the same stabilizer and knobs."""
    root = tmp_path / "sweep"
    write_run(root, stabilizer="llrd", seed=0, config=[], folder=root / "asked_llrd")
    picked = write_run(root, stabilizer="llrd", seed=1, config=[], folder=root / "picked")
    config = picked / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("stabilizer:\n  llrd:\n    decay: 0.9",
                                                 "stabilizer:\n  recommended: true"))
    assert "recommended" in config.read_text()
    summary = summary_of(root, tmp_path / "out")
    assert len(summary) == 1 and summary.runs.iloc[0] == 2


def _edit_results(folder: Path, **changes: object) -> None:
    path = folder / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_run_time_choices_group_by_what_was_applied(tmp_path: Path) -> None:
    """`data.group_by_length: auto` groups with the runs that trained as it chose to."""
    root = tmp_path / "sweep"
    write_run(root, seed=0, config=["data.group_by_length=false"], folder=root / "off")
    _edit_results(write_run(root, seed=1, config=["data.group_by_length=auto"],
                            folder=root / "auto_off"), group_by_length=False)
    _edit_results(write_run(root, seed=2, config=["data.group_by_length=auto"],
                            folder=root / "auto_on"), group_by_length=True)
    summary = summary_of(root, tmp_path / "out")
    assert sorted(zip(summary["data.group_by_length"], summary.runs, strict=True)) == [
        (False, 2), (True, 1)]


@pytest.mark.parametrize("key, line, other", [
    ("trainer.compile", "  compile: false\n", "true"),
    ("model.new_head", "  new_head: false\n", "true"),
    ("trainer.max_steps", "  max_steps: -1\n", "5"),
])
def test_a_key_added_later_reads_as_what_older_runs_did(tmp_path: Path, key: str, line: str,
                                                        other: str) -> None:
    """A run made before a key existed ran as its default says (uncompiled, the saved head
    kept, no limit on steps): it groups with runs that set the default, and apart from others."""
    root = tmp_path / "sweep"
    old = write_run(root, seed=0, config=[], folder=root / "old")
    config = old / ".hydra" / "config.yaml"
    assert line in config.read_text()
    config.write_text(config.read_text().replace(line, ""))
    default = {"trainer.compile": "false", "model.new_head": "false", "trainer.max_steps": "-1"}
    write_run(root, seed=1, config=[f"{key}={default[key]}"], folder=root / "new")
    write_run(root, seed=2, config=[f"{key}={other}"], folder=root / "changed")
    summary = summary_of(root, tmp_path / "out")
    assert sorted(summary.runs) == [1, 2]


def test_folders_without_config_group_by_results(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for epochs in (1, 2):
            folder = write_run(root, seed=seed, max_epochs=epochs, folder=root / f"{epochs}{seed}")
            (folder / ".hydra" / "config.yaml").unlink()
    write_run(root, seed=0, config=[], folder=root / "with_config")  # never pooled with them
    summary = summary_of(root, tmp_path / "out")
    assert len(summary) == 3
    hand = summary[summary["config file"] == "none (results.json only)"]
    assert sorted(hand["trainer.max_epochs"]) == [1, 2] and list(hand.runs) == [2, 2]


def test_duplicate_seed_is_named_and_excluded(tmp_path: Path, capsys) -> None:
    root = tmp_path / "sweep"
    for seed in (0, 1):
        write_run(root, seed=seed, test=(0.6 + 0.1 * seed, 0.6), config=[],
                  folder=root / f"none{seed}")
        write_run(root, stabilizer="llrd", seed=seed, test=(0.7, 0.7), config=[],
                  folder=root / f"llrd{seed}")
    # the same llrd run again, in another folder (another sweep name, save_model on)
    again = write_run(root, stabilizer="llrd", seed=1, test=(0.2, 0.2),
                      config=["save_model=true", "name=again"], folder=root / "again" / "llrd1")
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "LEFT OUT: 1 CONFIGURATION(S) WITH TWO FINISHED RUNS OF THE SAME SEEDS" in err
    assert f"seed 1, data_seed 1, init_seed 1 in {again} and {root / 'llrd1'}" in err
    out = tmp_path / "out"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.stabilizer) == ["none"]
    for name in ("paired.csv", "verdict.csv"):
        assert pd.read_csv(out / name).empty
    assert set(pd.read_csv(out / "expected_max.csv").stabilizer) == {"none"}
    assert "llrd1" in (out / "summary.md").read_text()  # named in the table's notes too
    runs = pd.read_csv(out / "runs.csv")
    assert runs[runs.stabilizer == "llrd"].excluded.all()
    assert not runs[runs.stabilizer == "none"].excluded.any()


def test_resolver_calls_are_compared_as_written(tmp_path: Path) -> None:
    """`${oc.env:...}` and blurbtune's resolvers answer for the reader's machine, not the run's."""
    from blurbtune.report.identity import resolved_config

    path = tmp_path / "config.yaml"
    path.write_text("a: ${oc.env:HOME}\nb: ${a}\nc: ${d}\nd: 3\ne: ${nowhere}\n")
    config = resolved_config(path)
    assert config == {"a": "${oc.env:HOME}", "b": "${oc.env:HOME}", "c": 3, "d": 3,
                      "e": "${nowhere}"}


def test_exclusions_are_listed_once() -> None:
    from blurbtune.report.identity import excluded

    for key in ("seed", "data_seed", "init_seed", "data.cache_dir", "run_dir", "name",
                "hydra.launcher.n_jobs", "data.num_workers", "save_model", "keep_checkpoints",
                "dry_run", "logger.mlflow.uri", "data_dir", "model.name_or_path", "model.name",
                "stabilizer.llrd.decay"):
        assert excluded(key), key
    for key in ("trainer.max_epochs", "optimizer.lr", "data.max_train_examples", "deterministic",
                "model.config.hidden_size", "names", "data.num_workers_extra"):
        assert not excluded(key), key


def test_every_configuration_left_out_still_writes_tables(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    write_run(root, seed=0, folder=root / "a")
    write_run(root, seed=0, folder=root / "b")
    assert main([str(root)]) == 0
    summary = pd.read_csv(root / "report" / "summary.csv")
    assert summary.empty and {"config", "test_best_mean", "failures"} <= set(summary.columns)
    assert "Left out of every table" in (root / "report" / "stability.md").read_text()


def test_a_technique_at_its_own_lr_is_compared_with_none_at_the_reference_lr(
        tmp_path: Path) -> None:
    """LoRA run at lr 1e-3, plain fine-tuning at 1e-4 and 3e-5: without --reference-lr (no
    `none` at 1e-3) LoRA's verdict row says it was not compared, and why; with --reference-lr
    1e-4, LoRA against `none` at 1e-4, the Δ mean being the paired mean difference computed by
    hand."""
    none = {0: 0.30, 1: 0.50, 2: 0.20, 3: 0.45}
    lora = {0: 0.60, 1: 0.55, 2: 0.40, 3: 0.70}
    for seed in range(4):
        write_run(tmp_path, stabilizer="none", seed=seed, test=(none[seed], none[seed]),
                  lr=1e-4, config=["task.lr=1e-4"])
        write_run(tmp_path, stabilizer="none", seed=seed, test=(0.1, 0.1), lr=3e-5,
                  config=["task.lr=3e-5"])
        write_run(tmp_path, stabilizer="lora", seed=seed, test=(lora[seed], lora[seed]),
                  lr=1e-3, config=["task.lr=1e-3"])
    plain = make_report([tmp_path], tmp_path / "plain")
    [row] = pd.read_csv(plain["verdict.csv"]).query("stabilizer == 'lora'").itertuples()
    assert row.verdict.startswith("not compared: no `none` run in an otherwise identical")
    assert pd.isna(row.ref_config) and pd.isna(row.mean_diff)
    assert "| lora |" in plain["verdict.md"].read_text().replace("| minilm | biosses ", "")
    assert main([str(tmp_path), "--out", str(tmp_path / "ref"), "--reference-lr", "1e-4"]) == 0
    verdict = pd.read_csv(tmp_path / "ref" / "verdict.csv")
    [row] = verdict[verdict.stabilizer == "lora"].itertuples()
    diffs = [lora[s] - none[s] for s in range(4)]
    assert row.mean_diff == pytest.approx(statistics.mean(diffs))
    assert row.ttest_p == pytest.approx(sps.ttest_rel(list(lora.values()),
                                                      list(none.values())).pvalue)
    assert row.reference_lr == pytest.approx(1e-4)
    assert "(against none at lr 0.0001)" in (tmp_path / "ref" / "verdict.md").read_text()
