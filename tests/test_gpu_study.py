"""The cross-task study prepared for a GPU (issue 19), checked without one: the presets compose
and stack into 4 jobs of 10 seeds, and scripts/gpu_study.py runs, falls back to unstacked runs
when stacking gives nothing, and packs finished runs only."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from blurbtune.config import compose
from hydra_plugins.blurbtune_stacked.stacked_sweeper import stack_jobs

ROOT = Path(__file__).resolve().parents[1]
STUDY_TASKS = ["pubmedqa", "gad", "hoc"]
STABILIZERS = ["none", "freeze_lower", "llrd", "reinit_top"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", STUDY_TASKS)
def test_study_preset_is_the_task_recipe_in_four_stacks_of_ten(task):
    cfg = compose([f"experiment=study_{task}", "hydra/sweeper=stacked", "hydra.sweeper.size=10"])
    recipe = compose([f"task={task}"]).task
    assert (cfg.model.name, cfg.task.name, cfg.name) == ("minilm", task, f"study-minilm-{task}")
    assert (cfg.task.lr, cfg.task.batch_size, cfg.trainer.max_epochs) == \
        (recipe.lr, recipe.batch_size, recipe.epochs)
    assert cfg.test_every_epoch is True
    params = cfg.hydra.sweeper.params
    assert params.seed == "range(10)"
    assert params.stabilizer.split(",") == STABILIZERS
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    assert cfg.hydra.sweeper._target_.endswith(".StackedSweeper")
    runs = BasicSweeper.split_arguments(parsed, None)[0]  # what the stacked sweeper stacks
    jobs = stack_jobs(runs, lambda job: int(cfg.hydra.sweeper.size))
    assert len(runs) == 40
    assert sorted(sorted(job) for job in jobs) == sorted(
        sorted([f"stabilizer={s}", f"stack=[{','.join(map(str, range(10)))}]"])
        for s in STABILIZERS)


def test_gpu_study_cost_table_matches_the_task_configs():
    costs = _script("gpu_study").COSTS
    assert sorted(costs) == sorted(STUDY_TASKS)
    for task, (_, steps) in costs.items():
        t = compose([f"task={task}"]).task
        assert steps == math.ceil(t.blurb.counts.train / t.batch_size) * t.epochs


@pytest.mark.parametrize("script", ["gpu_study", "pack_for_gpu"])
def test_script_help_runs(script):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def _write_run(sweep: Path, name: str, status: str) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / "predictions").mkdir()
    (run / "checkpoints").mkdir()
    (run / "model").mkdir()
    (run / "results.json").write_text(json.dumps({"status": status}))
    for path in (".hydra/config.yaml", "predictions/test.jsonl", "provenance.json",
                 "metrics.csv", "param_groups.json", "train.log", "run.lock",
                 "checkpoints/last.ckpt", "model/model.safetensors"):
        (run / path).write_text("x")
    return run


def test_stacked_sweep_with_no_result_is_run_again_unstacked(tmp_path):
    gpu_study = _script("gpu_study")
    args = gpu_study.build_parser().parse_args(["--out", str(tmp_path / "out"),
                                                "--work", str(tmp_path / "work")])
    calls = []

    def runner(argv, env, log_path, stop_at, grace, prefix):
        calls.append(argv)
        stacked = "hydra/sweeper=stacked" in argv
        _write_run(log_path.parent, "seed=0,stabilizer=none", "failed" if stacked else "completed")
        return "done"

    attempts, stacked = gpu_study.attempt_task("gad", ["trainer=gpu"], args, {},
                                               time.monotonic() + 1000, True, runner)
    assert stacked is False  # the tasks after it run unstacked too
    assert [(a["sweep"], a["stacked"], a["runs"]) for a in attempts] == [
        ("gad", True, {"failed": 1}), ("gad-unstacked", False, {"completed": 1})]
    assert {"hydra.sweeper.size=10", "hydra.launcher.n_jobs=4"} <= set(calls[0])
    assert "hydra/sweeper=stacked" not in calls[1]
    assert {"hydra/launcher=parallel", "hydra.launcher.n_jobs=8"} <= set(calls[1])

    def stacks_fine(argv, env, log_path, stop_at, grace, prefix):
        _write_run(log_path.parent, "seed=0,stabilizer=none", "completed")
        return "done"

    attempts, stacked = gpu_study.attempt_task("hoc", [], args, {}, time.monotonic() + 1000,
                                               True, stacks_fine)
    assert stacked is True and len(attempts) == 1  # the next task stacks too


def test_pack_keeps_finished_runs_without_checkpoints_or_weights(tmp_path):
    gpu_study = _script("gpu_study")
    sweep = tmp_path / "hoc"
    _write_run(sweep, "seed=0,stabilizer=none", "completed")
    _write_run(sweep, "seed=1,stabilizer=none", "diverged")
    _write_run(sweep, "seed=2,stabilizer=none", "interrupted")  # resumable, not a result
    _write_run(sweep, "seed=3,stabilizer=none", "running")  # stopped between runs
    stack = sweep / "stabilizer=none,stack=[0,1]"
    stack.mkdir()
    for name in ("stack.json", "train.log", "notes.txt"):
        (stack / name).write_text("x")
    (sweep / "multirun.yaml").write_text("x")
    (sweep / "console.log").write_text("x")
    target = tmp_path / "study-hoc.tar.xz"
    gpu_study.pack([("hoc", sweep)], target)
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
    run_files = {".hydra/config.yaml", "predictions/test.jsonl", "provenance.json", "metrics.csv",
                 "param_groups.json", "train.log", "results.json"}
    assert names == {"hoc/multirun.yaml", "hoc/console.log",
                     "hoc/stabilizer=none,stack=[0,1]/stack.json",
                     "hoc/stabilizer=none,stack=[0,1]/train.log",
                     *(f"hoc/seed={s},stabilizer=none/{f}" for s in (0, 1) for f in run_files)}


def _result(lr: float, seed: int, dev: float, *, collapsed: bool = False,
            status: str = "completed", baseline: float = 0.5) -> dict:
    """A pilot run's results.json, as much of it as the pilot rule reads."""
    return {"status": status, "stabilizer": "none", "lr": lr, "seed": seed,
            "dev": {"best": dev, "last": dev}, "test": {"best": dev, "last": dev},
            "baseline": {"dev": baseline, "test": baseline},
            "collapsed": {"dev": collapsed, "test": collapsed}}


def test_degenerate_on_dev_is_the_reports_flag_read_on_dev():
    """The pilot's test is blurbtune report's `is_degenerate` (constant predictions, or no
    better than the constant predictor), applied to dev instead of test."""
    import pandas as pd

    from blurbtune.report.stats import is_degenerate

    gpu_study = _script("gpu_study")
    cases = [_result(1e-4, 0, 0.7), _result(1e-4, 1, 0.5), _result(1e-4, 2, 0.4),
             _result(1e-4, 3, 0.7, collapsed=True), _result(1e-4, 4, 0.51)]
    frame = pd.DataFrame({"status": [c["status"] for c in cases],
                          "test_best": [c["dev"]["best"] for c in cases],
                          "baseline_test": [c["baseline"]["dev"] for c in cases],
                          "collapsed_test": [c["collapsed"]["dev"] for c in cases]})
    assert [gpu_study.degenerate_on_dev(c) for c in cases] == is_degenerate(frame).tolist()
    assert gpu_study.degenerate_on_dev(_result(1e-4, 5, 0.9, status="interrupted"))


def test_pilot_never_picks_an_lr_where_a_run_collapsed():
    gpu_study = _script("gpu_study")
    results = [
        # 3e-4: the best mean dev (0.80), but seed 101's predictions collapsed to one class.
        _result(3e-4, 100, 0.95), _result(3e-4, 101, 0.65, collapsed=True),
        # 1e-4 and 3e-5 tie at 0.70: the lower lr is chosen.
        _result(1e-4, 100, 0.72), _result(1e-4, 101, 0.68),
        _result(3e-5, 100, 0.70), _result(3e-5, 101, 0.70),
        # 1e-3: one run did not complete.
        _result(1e-3, 100, 0.99), _result(1e-3, 101, 0.99, status="interrupted")]
    rows = gpu_study.pilot_table(results)
    by_lr = {r["lr"]: r for r in rows}
    assert [r["lr"] for r in rows] == [3e-5, 1e-4, 3e-4, 1e-3]
    assert by_lr[3e-4]["mean_dev"] == pytest.approx(0.80) and by_lr[3e-4]["degenerate"] == 1
    assert by_lr[1e-3]["mean_dev"] is None and by_lr[1e-3]["dev_best"] == [0.99, None]
    assert gpu_study.choose_lr(rows) == 3e-5
    assert [r["lr"] for r in rows if r["chosen"]] == [3e-5]
    # Nothing learns: no choice, whatever the means.
    flat = [_result(lr, s, 0.5) for lr in (3e-5, 1e-4) for s in (100, 101)]
    assert gpu_study.choose_lr(gpu_study.pilot_table(flat)) is None


def _args(gpu_study, tmp_path: Path, *extra: str):
    return gpu_study.build_parser().parse_args(
        ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra])


def _fake_sweeps(pilot_devs: dict[float, float], calls: list):
    """A runner standing in for train.py -m: writes a results.json per run the sweep's
    overrides name (pilot: stabilizer none, each lr x seed; study: each stabilizer x seed)."""
    def runner(argv, env, log_path, stop_at, grace, prefix):
        calls.append(argv)
        over = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("hydra"))
        lrs = [float(v) for v in over["task.lr"].split(",")]
        seed = over["seed"]
        seeds = range(*map(int, seed[6:-1].split(","))) if seed.startswith("range(") else \
            [int(s) for s in seed.split(",")]
        stabs = over.get("stabilizer", "none,freeze_lower,llrd,reinit_top").split(",")
        for lr in lrs:
            for stab in stabs:
                for s in seeds:
                    run = log_path.parent / f"seed={s},stabilizer={stab},task.lr={lr:g}"
                    run.mkdir(parents=True)
                    r = _result(lr, s, pilot_devs.get(lr, 0.8), baseline=0.54)
                    (run / "results.json").write_text(json.dumps({**r, "stabilizer": stab}))
        return "done"
    return runner


def test_pilot_then_study_at_the_chosen_lr_in_one_archive_and_one_summary(tmp_path):
    gpu_study = _script("gpu_study")
    args = _args(gpu_study, tmp_path, "--tasks", "pubmedqa,gad,hoc")
    calls: list = []
    # PubMedQA: 3e-5 sits at the majority class (0.54 = the constant predictor), 1e-4 learns
    # best; HoC: nothing learns. GAD is not piloted: its study runs at its preset's lr.
    devs = {3e-5: 0.54, 1e-4: 0.70, 3e-4: 0.60, 5e-5: 0.54}
    runner = _fake_sweeps(devs, calls)

    def no_hoc(argv, env, log_path, stop_at, grace, prefix):
        if "experiment=study_hoc" in argv:
            devs.update({1e-4: 0.54, 3e-4: 0.54})
        return runner(argv, env, log_path, stop_at, grace, prefix)

    entries = gpu_study.run_tasks(["pubmedqa", "gad", "hoc"], ["trainer=gpu"], args, {},
                                  time.monotonic() + 1000, no_hoc)
    pilot, study, gad, hoc_pilot = calls
    assert {"experiment=study_pubmedqa", "stabilizer=none", "task.lr=3e-05,0.0001,0.0003",
            "seed=100,101,102", "hydra.sweeper.size=3", "hydra.launcher.n_jobs=3"} <= set(pilot)
    assert {"experiment=study_pubmedqa", "task.lr=0.0001", "seed=range(10)",
            "hydra.sweeper.size=10", "hydra.launcher.n_jobs=4"} <= set(study)
    assert not any(a.startswith("stabilizer=") for a in study)  # the preset's four
    assert {"experiment=study_gad", "task.lr=3e-05"} <= set(gad)
    assert "task.lr=3e-05,5e-05,0.0001,0.0003" in hoc_pilot
    p, g, h = entries
    assert (p["lr"], p["pilot"]["chosen"], p["status"]) == (1e-4, 1e-4, "done")
    assert [r["degenerate"] for r in p["pilot"]["rows"]] == [3, 0, 0]
    assert "pilot" not in g and g["lr"] == 3e-5
    assert h["pilot"]["chosen"] is None and "lr" not in h
    assert h["status"] == "no lr of the pilot learned: study not run"
    sweeps = gpu_study.sweeps_of(entries, args.work)
    assert [name for name, _ in sweeps] == ["pilot-pubmedqa", "pubmedqa", "gad", "pilot-hoc"]
    target = tmp_path / "out" / gpu_study.ARCHIVE
    target.parent.mkdir(parents=True)
    gpu_study.pack(sweeps, target)
    with tarfile.open(target) as tar:
        tops = {name.split("/")[0] for name in tar.getnames()}
    assert tops == {"pilot-pubmedqa", "pubmedqa", "gad", "pilot-hoc"}
    json.dumps(entries)  # the summary is plain JSON


def test_a_study_starts_only_the_whole_stabilizers_that_fit():
    gpu_study = _script("gpu_study")
    fit = gpu_study.stabilizers_that_fit
    factor = gpu_study.ROUND_FACTOR
    assert fit(left=100, round_s=None, jobs=4) == 4  # nothing predicts: all
    assert fit(left=1.5 * 100 * factor, round_s=100, jobs=4) == 4  # one round of four
    assert fit(left=0.9 * 100 * factor, round_s=100, jobs=4) == 0
    assert fit(left=2.5 * 100 * factor, round_s=100, jobs=1) == 2  # none, freeze_lower
    assert tuple(STABILIZERS) == gpu_study.STUDY_STABILIZERS


def test_a_round_is_predicted_from_the_last_one_measured():
    """HoC's round from PubMedQA's: the larger of the tokens x epochs ratio (9,110,640 /
    2,917,240 = 3.12) and the steps ratio (1620 / 580 = 2.79), by hand."""
    gpu_study = _script("gpu_study")
    assert gpu_study.predict_round("hoc", []) is None
    assert gpu_study.predict_round("hoc", [("gad", 50.0), ("pubmedqa", 200.0)]) == \
        pytest.approx(200.0 * 9_110_640 / 2_917_240)
    assert gpu_study.predict_round("pubmedqa", [("hoc", 600.0)]) == \
        pytest.approx(600.0 * 580 / 1620)


def test_lr_given_skips_the_pilot(tmp_path):
    gpu_study = _script("gpu_study")
    args = _args(gpu_study, tmp_path, "--lr", "pubmedqa=1e-4", "--pilot", "pubmedqa,hoc")
    assert gpu_study.task_plan(args, ["pubmedqa", "gad", "hoc"]) == \
        {"pubmedqa": 1e-4, "gad": 3e-5, "hoc": None}


@pytest.mark.parametrize("flags, message", [
    (["--pilot-seeds", "100,3"], "may not be a study seed"),
    (["--grace-s", "90", "--pack-s", "60"], "must exceed --grace-s"),
    (["--tasks", "pubmedqa,biosses"], "unknown ['biosses']"),
    (["--lr", "pubmedqa"], "expected TASK=LR")])
def test_bad_flags_are_one_clear_error(tmp_path, flags, message):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_study.py"),
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                           *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error:" in done.stderr and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_lrs_are_the_task_configs():
    gpu_study = _script("gpu_study")
    for task, lr in gpu_study.RECIPE_LR.items():
        assert compose([f"task={task}"]).task.lr == lr


def test_lr_pilot_block_from_what_a_call_returns(tmp_path):
    """docs/study.md's lr-pilot block, made by scripts/study_doc.py from the `pilot-<task>/`
    folders of a call's archive (here: the stand-in runner's), against the table by hand."""
    gpu_study, study_doc = _script("gpu_study"), _script("study_doc")
    args = _args(gpu_study, tmp_path, "--tasks", "pubmedqa", "--pilot-seeds", "100,101")
    runner = _fake_sweeps({3e-5: 0.54, 1e-4: 0.70, 3e-4: 0.60}, [])
    gpu_study.run_tasks(["pubmedqa"], [], args, {}, time.monotonic() + 1000, runner)
    assert study_doc.lr_pilot_markdown(args.work).splitlines()[2:] == [
        "| pubmedqa | 3e-05 | 100, 101 | 54.0, 54.0 | 54.0 | 2/2 |  |",
        "| pubmedqa | 0.0001 | 100, 101 | 70.0, 70.0 | 70.0 | 0/2 | yes |",
        "| pubmedqa | 0.0003 | 100, 101 | 60.0, 60.0 | 60.0 | 0/2 |  |"]
    assert "no pilot has run yet" in study_doc.lr_pilot_markdown(tmp_path / "empty")
