"""Sweeps: presets compose, run folders, failures, resume, launchers, optuna, and the report.

The end-to-end tests run `train.py -m` in a subprocess on the tiny model, BIOSSES-format data
(the project's fixtures when present, else a few generated pairs) and one short epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from blurbtune.config import compose, config_dir, dirname

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "blurb"
CONF = Path(config_dir())
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STABILIZERS = ["none", "freeze_lower", "llrd", "reinit_top"]
TEN_SEEDS = {"biosses", "pubmedqa", "bioasq"}  # BLURB runs its three smallest sets 10 times
SHORT = ["experiment=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]


# ---------------------------------------------------------------- presets compose


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    cfg = compose([f"experiment={experiment}", "model=tiny"])
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(body, resolve=True)
    params = cfg.hydra.sweeper.get("params") or {}
    assert all(str(v) for v in params.values())  # interpolations in sweep params resolve


@pytest.mark.parametrize("task", TASKS)
def test_stability_preset_per_task(task):
    cfg = compose([f"experiment=stability_{task}", "model=tiny"])
    params = cfg.hydra.sweeper.params
    assert cfg.task.name == task
    assert params.task == task  # the task is in every run's folder name
    assert params.stabilizer.split(",") == STABILIZERS
    assert params.seed == f"range({10 if task in TEN_SEEDS else 5})"
    assert cfg.name == "stability-tiny"


def test_stability_blurb_covers_all_tasks_with_one_folder():
    cfg = compose(["experiment=stability_blurb", "model=minilm"])
    params = cfg.hydra.sweeper.params
    assert sorted(params.task.split(",")) == TASKS
    assert params.stabilizer.split(",") == STABILIZERS
    assert params.seed == "range(5)"
    assert cfg.name == "stability-minilm"
    assert cfg.hydra.sweep.dir == "outputs/multirun/stability-minilm"


def test_optuna_preset_searches_lr_decay_and_k():
    cfg = compose(["experiment=optuna_search", "model=tiny"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {
        "optimizer.lr", "stabilizer.llrd.decay", "stabilizer.reinit.layers"}
    assert set(cfg.stabilizer) == {"llrd", "reinit"}


@pytest.mark.parametrize("launcher,target,key,value", [
    ("parallel", "JoblibLauncher", "n_jobs", 2),
    ("slurm_gpu", "SlurmLauncher", "gpus_per_node", 1),
    ("local_jobs", "LocalLauncher", "gpus_per_node", 0),
])
def test_launcher_presets_compose(launcher, target, key, value):
    cfg = compose([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher[key] == value


def test_composed_stabilizers_and_knobs():
    cfg = compose(["stabilizer=[llrd,reinit_top]", "stabilizer.llrd.decay=0.7",
                   "stabilizer.reinit.layers=2"])
    assert OmegaConf.to_container(cfg.stabilizer) == {
        "llrd": {"decay": 0.7}, "reinit": {"layers": 2, "pooler": True}}


# ---------------------------------------------------------------- run folder names


def test_dirname_is_one_readable_unique_component():
    assert dirname("seed=3,stabilizer=llrd") == "seed=3,stabilizer=llrd"
    slash, underscore = dirname("model.name_or_path=a/b"), dirname("model.name_or_path=a_b")
    assert "/" not in slash and slash.startswith("model.name_or_path=a_b")
    assert slash != underscore
    assert slash == dirname("model.name_or_path=a/b")
    long = ",".join(f"optimizer.lr{i}=0.0001234567" for i in range(40))
    assert len(dirname(long).encode()) <= 255
    assert dirname(long) != dirname(long + "1")


# ---------------------------------------------------------------- end to end


@pytest.fixture
def workdir(tmp_path):
    """A folder to run sweeps in, and the environment that points them at the data."""
    data = FIXTURES if (FIXTURES / "BIOSSES").is_dir() else _write_biosses(tmp_path / "blurb")
    env = dict(os.environ, BLURB_DATA_DIR=str(data), BLURBTUNE_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HYDRA_FULL_ERROR="1")
    return tmp_path, env


def _write_biosses(root: Path) -> Path:
    rng = random.Random(0)
    words = ["kinase", "tumour", "gene", "cell", "protein", "mutation", "expression",
             "receptor", "pathway"]
    folder = root / "BIOSSES"
    folder.mkdir(parents=True)
    for split, n in (("train", 24), ("dev", 8), ("test", 8)):
        rows = ["pair_id\tsent1\tsent2\tscore"]
        for i in range(n):
            s1, s2 = (" ".join(rng.choices(words, k=8)) for _ in range(2))
            rows.append(f"{split}{i}\t{s1}\t{s2}\t{rng.uniform(0, 4):.1f}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def _sweep(workdir, *overrides: str, status: int = 0) -> subprocess.CompletedProcess:
    """Run a sweep; `status` 1: a run of it fails (the sweep ends so, after the others)."""
    cwd, env = workdir
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *overrides], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def _results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def _folder(**overrides) -> str:
    """Hydra's override_dirname, recomputed: `key=value` pairs sorted, joined by commas."""
    return ",".join(sorted(f"{k}={v}" for k, v in overrides.items()))


@pytest.mark.slow
def test_stability_sweep_survives_a_failure_resumes_and_reports(workdir):
    """4 stabilizers x 3 seeds with joblib and DataLoader workers; one run fails; rerun."""
    cwd, _ = workdir
    grid = [*SHORT, "name=study", f"stabilizer={','.join(STABILIZERS)}", "seed=0,1,2",
            "hydra/launcher=parallel", "data.num_workers=1"]
    sweep = cwd / "outputs" / "multirun" / "study"
    short = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2}
    doomed = sweep / _folder(seed=1, stabilizer="llrd", **short)
    doomed.mkdir(parents=True)
    (doomed / "predictions").write_text("a file where the run writes its predictions folder")

    failed = _sweep(workdir, *grid, status=1)
    assert _last_line(failed).startswith("error: 1 run of this sweep failed, the others ran")
    assert doomed.name in _last_line(failed)
    assert not list(sweep.glob(".failed-runs-*"))
    first = _results(sweep)
    expected = {_folder(seed=s, stabilizer=st, **short) for s in range(3) for st in STABILIZERS}
    assert set(first) == expected
    assert first[doomed.name]["status"] == "failed"
    assert "predictions" in first[doomed.name]["error"]
    assert (doomed / "error.log").is_file()
    done = {name for name, r in first.items() if r["status"] == "completed"}
    assert done == expected - {doomed.name}
    for name, r in first.items():
        assert (r["stabilizer"], r["seed"]) == (name.split("stabilizer=")[1].split(",")[0],
                                                int(name.split("seed=")[1].split(",")[0]))
    mtimes = {name: (sweep / name / "results.json").stat().st_mtime_ns for name in done}

    (doomed / "predictions").unlink()
    rerun = _sweep(workdir, *grid)
    second = _results(sweep)
    assert all(r["status"] == "completed" for r in second.values())
    assert {n: (sweep / n / "results.json").stat().st_mtime_ns for n in done} == mtimes
    assert (rerun.stdout + rerun.stderr).count("already completed, skipping") == len(done)
    assert not (doomed / "error.log").exists()

    from blurbtune.report.cli import main as report_main

    assert report_main([str(sweep)]) == 0
    out = sweep / "report"
    for name in ("runs.csv", "summary.csv", "summary.md", "summary.tex"):
        assert (out / name).stat().st_size > 0
    assert list(out.rglob("*.png"))
    summary = pd.read_csv(out / "summary.csv").set_index("stabilizer")
    for stabilizer in STABILIZERS:
        scores = [r["test"]["best"] for r in second.values() if r["stabilizer"] == stabilizer]
        assert len(scores) == 3
        assert summary.loc[stabilizer, "test_best_mean"] == pytest.approx(
            statistics.mean(scores), abs=1e-12)
        assert summary.loc[stabilizer, "test_best_std"] == pytest.approx(
            statistics.stdev(scores), abs=1e-12)


@pytest.mark.slow
def test_two_seed_multirun_with_submitit_local(workdir):
    cwd, _ = workdir
    _sweep(workdir, *SHORT, "name=two", "seed=0,1", "hydra/launcher=local_jobs")
    sweep = cwd / "outputs" / "multirun" / "two"
    results = _results(sweep)
    short = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2}
    assert set(results) == {_folder(seed=0, **short), _folder(seed=1, **short)}
    assert sorted(r["seed"] for r in results.values()) == [0, 1]
    assert all(r["status"] == "completed" and r["epochs_run"] == 1 for r in results.values())
    assert (sweep / ".submitit").is_dir()


@pytest.mark.slow
def test_bad_knob_and_divergence_are_recorded_and_the_sweep_goes_on(workdir):
    """Basic launcher: lr=1e30 makes the loss NaN (diverged); 99 layers is a bad knob (failed)."""
    cwd, _ = workdir
    failed = _sweep(workdir, *SHORT, "name=bad", "stabilizer=reinit_top", "optimizer.lr=1e30",
                    "stabilizer.reinit.layers=1,99", status=1)
    assert _last_line(failed).startswith("error: 1 run of this sweep failed")  # not the diverged
    assert "stabilizer.reinit.layers=99" in _last_line(failed)
    results = _results(cwd / "outputs" / "multirun" / "bad")
    by_layers = {r["stabilizer_knobs"]["reinit.layers"]: r for r in results.values()}
    assert by_layers[1]["status"] == "diverged"
    assert by_layers[1]["error"].startswith("DivergedError: training loss became nan")
    assert by_layers[99]["status"] == "failed"
    assert "stabilizer.reinit.layers" in by_layers[99]["error"]


@pytest.mark.slow
def test_a_sweep_over_data_it_cannot_read_reuses_nothing_and_ends_non_zero(workdir):
    """Issue 28: seeds 0-1 trained on the fixtures; the same sweep of seeds 0-2 pointed at a
    folder with no data refuses their folders (their data cannot be shown to be this
    command's), runs seed 2 (which fails), and exits 1 naming all three."""
    cwd, _ = workdir
    grid = [*SHORT, "name=data", "stabilizer=none"]
    sweep = cwd / "outputs" / "multirun" / "data"
    _sweep(workdir, *grid, "seed=range(2)")
    before = {n: (sweep / n / "results.json").read_bytes() for n in _results(sweep)}
    again = _sweep(workdir, *grid, "seed=range(3)", f"data_dir={cwd / 'nothing'}", status=1)
    assert "already completed" not in again.stdout + again.stderr
    assert (again.stdout + again.stderr).count("holds a run of another configuration") == 2
    assert _last_line(again).startswith("error: 3 runs of this sweep failed")
    assert {n: (sweep / n / "results.json").read_bytes() for n in before} == before
    assert _results(sweep)[_folder(seed=2, stabilizer="none", **{
        "trainer.max_epochs": 1, "trainer.limit_train_batches": 2})]["status"] == "failed"


@pytest.mark.parametrize(("size", "shown"), [("0", "0"), ("abc", "'abc'"), ("1.5", "1.5"),
                                           ("-1", "-1")])
def test_a_bad_stack_size_is_one_line_before_any_run(workdir, size, shown):
    cwd, _ = workdir
    proc = _sweep(workdir, *SHORT, "seed=range(2)", "hydra/sweeper=stacked",
                  f"hydra.sweeper.size={size}", status=2)
    assert proc.stderr.strip().splitlines() == [
        f"error: hydra.sweeper.size={shown}: "
        "expected an integer ≥ 1 or auto (members per stack; auto: as many as a GPU holds)"]
    assert not (cwd / "outputs").exists() or not list((cwd / "outputs").rglob("results.json"))


@pytest.mark.slow
def test_optuna_search_survives_a_failed_trial(workdir):
    """lr=1e30 trials diverge and are told to optuna as failed; the search goes on.

    The preset's seeded sampler fixes which lr each trial draws; with this seed both occur.
    A trial that repeats a finished configuration finds its folder and reuses the result.
    """
    cwd, _ = workdir
    _sweep(workdir, "experiment=[smoke,optuna_search]", *SHORT[1:], "name=search",
           "hydra.sweeper.n_trials=3", "optimizer.lr=choice(1e30,2e-5)",
           "stabilizer.llrd.decay=choice(0.8)", "stabilizer.reinit.layers=choice(1)")
    sweep = cwd / "outputs" / "multirun" / "search"
    results = list(_results(sweep).values())
    assert len(results) == 2  # one folder per distinct configuration
    for r in results:
        assert r["status"] == ("diverged" if r["lr"] > 1 else "completed")
    assert {r["status"] for r in results} == {"completed", "diverged"}
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert math.isclose(best.best_value, max(r["dev"]["best"] for r in results
                                             if r["status"] == "completed"), abs_tol=1e-12)
    assert best.best_params["optimizer.lr"] == pytest.approx(2e-5)


# ---------------------------------------------------------------- stacked seeds


def test_the_stacked_sweeper_puts_together_the_jobs_that_differ_only_in_their_seed():
    from hydra_plugins.blurbtune_stacked.stacked_sweeper import stack_jobs

    jobs = [[f"stabilizer={st}", f"seed={s}", "x=1"] for st in ("none", "llrd")
            for s in range(5)] + [["stabilizer=none", "x=2"]]
    assert stack_jobs(jobs, lambda job: 2) == [
        ["stabilizer=none", "stack=[0,1]", "x=1"], ["stabilizer=none", "stack=[2,3]", "x=1"],
        ["stabilizer=none", "seed=4", "x=1"],
        ["stabilizer=llrd", "stack=[0,1]", "x=1"], ["stabilizer=llrd", "stack=[2,3]", "x=1"],
        ["stabilizer=llrd", "seed=4", "x=1"],
        ["stabilizer=none", "x=2"]]
    assert stack_jobs(jobs[:5], lambda job: 1) == jobs[:5]  # size 1: the unstacked sweep
    with pytest.raises(ValueError, match="drop stack="):
        stack_jobs([["stack=[0,1]"]], lambda job: 2)


def test_auto_size_is_one_without_a_cuda_device_and_fits_memory_with_one():
    import torch

    from blurbtune.probe import auto_size, fit_count

    if not torch.cuda.is_available():
        assert auto_size(lambda: pytest.fail("a CPU needs no probe")) == 1
    # a stack of 1 peaks at 3 GB, of 2 at 4 GB: 1 GB a member over 2 GB; 40 GB free
    assert fit_count(3 * 2**30, 4 * 2**30, 40 * 2**30, margin=1.0) == 38
    assert fit_count(3 * 2**30, 4 * 2**30, 40 * 2**30) == int((0.85 * 40 - 2) // 1)
    assert fit_count(5, 10, 1) == 1  # never less than one member


def _auto_sized_stacks(monkeypatch, launcher: dict, seeds: int, lrs: str) -> tuple[list, list]:
    """The stacked sweeper's jobs for `seed=0..seeds-1 optimizer.optim.lr=<lrs>` with
    size=auto on a faked CUDA device: 100 GiB free; a stack of 1 peaks at 3 GiB, of 2 at 4 GiB
    (1 GiB a member over 2 GiB). Returns the jobs and the probes run."""
    from types import SimpleNamespace

    import torch
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from blurbtune import probe
    from hydra_plugins.blurbtune_stacked.stacked_sweeper import StackedSweeper

    gib = 2**30
    probes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (100 * gib, 141 * gib))
    monkeypatch.setattr(probe, "peak_memory", lambda cfg, k, device: (
        probes.append(k), (2 + k) * gib)[1])
    def job_config(config, overrides):  # what Hydra composes for one job
        return OmegaConf.create({"model": {"name": "m"}, "task": {"batch_size": 8},
                                 "stabilizer": {}, "trainer": {},
                                 "optimizer": {"optim": {"lr": overrides[0]}}})
    sweeper = StackedSweeper(size="auto")
    sweeper.config = OmegaConf.create({"hydra": {"launcher": launcher}})
    sweeper.hydra_context = SimpleNamespace(config_loader=SimpleNamespace(
        load_sweep_config=job_config))
    overrides = OverridesParser.create().parse_overrides(
        [f"optimizer.optim.lr={lrs}", f"seed=range({seeds})"])
    return sweeper.split_arguments(overrides, None)[0], probes


def test_auto_size_shares_the_free_memory_among_the_jobs_that_run_at_once(monkeypatch):
    """Five parallel jobs each plan for a fifth of the free memory: (0.85 x 100/5 GiB - 2 GiB
    fixed) / 1 GiB a member = 15 members; the probe measures once for the sweep (the jobs
    differ in lr only: the same memory)."""
    parallel = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher."
                            "JoblibLauncher", "n_jobs": 5}
    jobs, probes = _auto_sized_stacks(monkeypatch, parallel, 30, "1e-5,2e-5,3e-5,4e-5,5e-5")
    sizes = [len(line.split("=", 1)[1].strip("[]").split(",")) for job in jobs for line in job
             if line.startswith("stack=")]
    assert sizes == [15, 15] * 5 and len(jobs) == 10
    assert probes == [1, 2]
    # The basic launcher runs one job at a time: it has all of it, (85 - 2) / 1 = 83 > 30.
    basic = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    jobs, _ = _auto_sized_stacks(monkeypatch, basic, 30, "1e-5")
    assert jobs == [["optimizer.optim.lr=1e-05", f"stack=[{','.join(map(str, range(30)))}]"]]


def test_the_probe_step_runs_a_stack_of_the_job(tmp_path):
    """The probe trains one step of a stack of 2 on the task's longest batch (here on the CPU,
    where it counts no memory)."""
    from blurbtune.probe import peak_memory

    cfg = compose(["model=tiny", "task=biosses", "stabilizer=[llrd,reinit_top]"])
    assert peak_memory(cfg, 2, "cpu") == 0


STACK_GRID = [*SHORT, "seed=0,1,2", "stabilizer=none,llrd", "trainer.limit_train_batches=3"]


@pytest.fixture(scope="module")
def plain_sweep(tmp_path_factory):
    """The unstacked sweep the stacked ones are compared with (run once for the module)."""
    root = tmp_path_factory.mktemp("plain-sweep")
    data = FIXTURES if (FIXTURES / "BIOSSES").is_dir() else _write_biosses(root / "blurb")
    env = dict(os.environ, BLURB_DATA_DIR=str(data), BLURBTUNE_CACHE=str(root / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HYDRA_FULL_ERROR="1")
    _sweep((root, env), *STACK_GRID, f"hydra.sweep.dir={root / 'plain'}")
    return root / "plain"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "parallel", "local_jobs"])
def test_a_stacked_sweep_writes_the_unstacked_sweeps_folders(workdir, plain_sweep, launcher):
    """seed=0,1,2 x two stabilizers, stacks of 2: four jobs (two stacks, two single runs);
    every run folder has the unstacked sweep's name, config and overrides, byte for byte,
    and its predictions (test_stacking checks members in full; the tiny model's near-constant
    similarity predictions make Pearson r too ill-conditioned to compare here)."""
    cwd, _ = workdir
    plain, stacked = plain_sweep, cwd / "stacked"
    extra = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    log = _sweep(workdir, *STACK_GRID, f"hydra.sweep.dir={stacked}", "hydra/sweeper=stacked",
                 "hydra.sweeper.size=2", *extra)
    a, b = _results(plain), _results(stacked)
    assert set(a) == set(b) and len(a) == 6
    for name in a:
        for record in ("config.yaml", "overrides.yaml"):
            assert (plain / name / ".hydra" / record).read_bytes() == (
                stacked / name / ".hydra" / record).read_bytes(), (name, record)
        assert b[name]["status"] == "completed"
        for split in ("dev", "test"):
            pa, pb = ([json.loads(line)["pred"] for line in (sweep / name / "predictions" /
                       f"{split}.jsonl").read_text().splitlines()] for sweep in (plain, stacked))
            assert all(abs(x - y) < 1e-6 for x, y in zip(pa, pb, strict=True))
        assert ("stack" in b[name]) == (b[name]["seed"] < 2)
    stacks = sorted(p.name for p in stacked.glob("*stack=*"))
    assert len(stacks) == 2 and all(json.loads((stacked / s / "stack.json").read_text())[
        "members"] == [{"seed": 0}, {"seed": 1}] for s in stacks)
    assert "stacked sweeper: 6 runs in 4 jobs" in log.stdout + log.stderr or launcher != "basic"

    from blurbtune.report.cli import main as report_main

    assert report_main([str(stacked)]) == 0
    runs = pd.read_csv(stacked / "report" / "runs.csv")
    assert len(runs) == 6 and runs["config"].nunique() == 2  # stacked runs group as singles


@pytest.mark.slow
def test_a_stack_is_an_ordinary_command(workdir):
    """`python train.py ... stack=[0,1]` (no -m) writes the single runs' folders beside its
    own, which holds only its log and stack.json."""
    cwd, env = workdir
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *SHORT, "stack=[0,1]",
                           "name=byhand"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = cwd / "outputs" / "runs" / "byhand"
    short = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2}
    names = {_folder(seed=0, **short), _folder(seed=1, **short)}
    assert names <= {p.name for p in runs.iterdir()}
    for name in names:
        assert json.loads((runs / name / "results.json").read_text())["status"] == "completed"
        assert (runs / name / "train.log").stat().st_size > 0
    own = runs / _folder(stack="[0,1]", **short)
    assert sorted(p.name for p in own.iterdir()) == ["stack.json", "train.log"]
