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
    assert "hydra.sweeper.size=10" in calls[0] and "hydra/launcher=parallel" not in calls[0]
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
