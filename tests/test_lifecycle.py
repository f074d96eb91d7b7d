"""A run's life: final statuses, the end of training, one process per run folder, stopping.

- `completed` and `diverged` are final: a rerun skips them (`rerun_diverged=true` reruns a
  diverged run); `failed` and `interrupted` runs are retried.
- However training ends (epochs, `max_steps`, between dev evaluations), dev is evaluated on the
  last model, and a failure after training keeps the dev scores and the checkpoint.
- One process at a time holds a run folder; SIGTERM to a parallel sweep stops its workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from scipy.stats import pearsonr
from tiny_runs import FIXTURES, needs_fixtures, prediction_bytes, tiny_config

from blurbtune.run import run

pytestmark = needs_fixtures
ROOT = Path(__file__).resolve().parents[1]
# Fixture BIOSSES: 16 training pairs in batches of 4 (tiny_config), so 4 steps an epoch.
COMPARED = ("dev", "test", "history", "best_epoch", "epochs_run", "collapsed")


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------- the end of training


@pytest.mark.parametrize("overrides, steps, epochs", [
    (["trainer.max_steps=2"], [2], [0]),  # stops mid-epoch, before any dev evaluation
    (["trainer.max_epochs=2", "+trainer.val_check_interval=3",
      "+trainer.check_val_every_n_epoch=null"], [3, 6, 8], [0, 1, 1]),
    (["trainer.max_epochs=3", "+trainer.check_val_every_n_epoch=2"], [8, 12], [1, 2]),
    (["+trainer.limit_train_batches=2"], [2], [0]),
])
def test_dev_is_evaluated_on_the_last_model_however_training_ends(tmp_path, cache, overrides,
                                                                   steps, epochs):
    run(tiny_config(tmp_path, cache, *overrides))
    r = _results(tmp_path)
    assert r["status"] == "completed", r.get("error")
    assert [h["step"] for h in r["history"]] == steps
    assert [h["epoch"] for h in r["history"]] == epochs
    assert r["dev"]["last"] == r["history"][-1]["dev"]
    assert r["dev"]["best"] == max(h["dev"] for h in r["history"])
    # The best-on-dev model's score is the metric of the predictions it wrote (Pearson r).
    rows = [json.loads(line) for line in (tmp_path / "predictions" / "dev.jsonl").open()]
    r_dev = pearsonr([x["gold"] for x in rows], [x["pred"] for x in rows]).statistic
    assert r["dev"]["best"] == pytest.approx(r_dev, abs=1e-6)


def test_trainer_max_steps_needs_no_plus():
    from blurbtune.config import compose

    assert compose(["trainer.max_steps=5"]).trainer.max_steps == 5


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("two_epochs")
    run(tiny_config(out, cache, "trainer.max_epochs=2", "save_model=true"))
    return out


def _fail_testing(monkeypatch):
    def test(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr("pytorch_lightning.Trainer.test", test)


def _fail_predictions(monkeypatch):
    def write(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr("blurbtune.run._write_predictions", write)


def _fail_saving(monkeypatch):
    def save(*args, **kwargs):
        raise OSError(122, "Disk quota exceeded (simulated)")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", save)


@pytest.mark.parametrize("fail, stage, simulated", [
    (_fail_testing, "testing", "CUDA out of memory"),
    (_fail_predictions, "writing predictions", "No space left"),
    (_fail_saving, "saving the model", "Disk quota"),
])
def test_a_failure_after_training_keeps_dev_scores_and_checkpoint(
        tmp_path, cache, two_epochs, monkeypatch, fail, stage, simulated):
    cfg = tiny_config(tmp_path, cache, "trainer.max_epochs=2", "save_model=true")
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises((RuntimeError, OSError), match=simulated):
            run(cfg)
    failed, reference = _results(tmp_path), _results(two_epochs)
    assert failed["status"] == "failed" and failed["stage"] == stage
    assert simulated in failed["error"]
    assert {k: failed[k] for k in ("dev", "best_epoch", "history")} == \
        {k: reference[k] for k in ("dev", "best_epoch", "history")}
    if stage != "testing":
        assert failed["test"] == reference["test"]
    assert Path(failed["checkpoint"]).is_file()

    run(cfg)  # the same command again finishes it from the checkpoint, training nothing more
    done = _results(tmp_path)
    assert done["status"] == "completed" and done["resumed_from"] == failed["checkpoint"]
    assert {k: done[k] for k in COMPARED} == {k: reference[k] for k in COMPARED}
    assert prediction_bytes(tmp_path) == prediction_bytes(two_epochs)


def test_a_divergence_keeps_its_dev_evaluations_and_is_final(tmp_path, cache, monkeypatch,
                                                            caplog):
    from blurbtune.errors import DivergedError
    from blurbtune.module import FineTuner

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.current_epoch == 1:
            raise DivergedError("training loss became nan at epoch 1, step 5 (simulated)")

    cfg = tiny_config(tmp_path, cache, "trainer.max_epochs=3")
    with monkeypatch.context() as m:
        m.setattr(FineTuner, "on_train_batch_end", on_train_batch_end)
        with pytest.raises(DivergedError):
            run(cfg)  # a single run stops with the error
    r = _results(tmp_path)
    assert r["status"] == "diverged" and r["stage"] == "training"
    assert [(h["epoch"], h["step"]) for h in r["history"]] == [(0, 4)]
    assert r["dev"] == {"best": r["history"][0]["dev"], "last": r["history"][0]["dev"]}
    assert r["checkpoint"] is None and not (tmp_path / "checkpoints").exists()  # final

    before = (tmp_path / "results.json").read_bytes()
    with caplog.at_level(logging.INFO, logger="blurbtune"):
        assert math.isnan(run(cfg))
    assert (tmp_path / "results.json").read_bytes() == before
    assert any("already diverged, skipping (DivergedError: training loss became nan at epoch 1"
               in rec.getMessage() for rec in caplog.records)


# ---------------------------------------------------------------- one process per run folder


@pytest.fixture
def no_training(monkeypatch):
    def fit(*args, **kwargs):
        raise AssertionError("a run trained in a folder that another process holds")

    monkeypatch.setattr("pytorch_lightning.Trainer.fit", fit)


def test_a_run_whose_folder_is_held_is_skipped_naming_the_holder(tmp_path, cache, caplog,
                                                                 monkeypatch, no_training):
    from blurbtune.lock import RunLock

    cfg = tiny_config(tmp_path, cache)
    with RunLock(tmp_path), caplog.at_level(logging.WARNING, logger="blurbtune"):
        assert math.isnan(run(cfg)) and math.isnan(run(cfg))  # skipped, twice
    lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(lines) == 2 and "\n" not in lines[0]
    assert f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d')}" \
        in lines[0]
    assert not (tmp_path / "results.json").exists()
    monkeypatch.undo()
    run(cfg)  # released: it runs
    assert _results(tmp_path)["status"] == "completed"


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, cache, caplog):
    script = ("import os, signal, sys\n"
              "from blurbtune.lock import RunLock\n"
              "RunLock(sys.argv[1]).acquire()\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert '"pid"' in (tmp_path / "run.lock").read_text()  # its record is still there
    with caplog.at_level(logging.INFO, logger="blurbtune"):
        run(tiny_config(tmp_path, cache))
    assert _results(tmp_path)["status"] == "completed"
    assert any("taking over the lock" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- sweeps (subprocesses)


def _train(cwd: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLURB_DATA_DIR": str(FIXTURES), "BLURBTUNE_CACHE": str(cwd / "cache"),
           "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke",
                           *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _statuses(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


@pytest.mark.slow
def test_diverged_runs_are_final_and_rerun_only_when_asked(tmp_path):
    """2 lr x 2 seeds; lr=1e30 makes the loss NaN. A rerun must not retry the divergences."""
    sweep = tmp_path / "sweep"
    grid = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "optimizer.lr=1e30,2e-5",
            "seed=0,1", f"hydra.sweep.dir={sweep}"]
    _train(tmp_path, *grid)
    first = _statuses(sweep)
    assert sorted(r["status"] for r in first.values()) == \
        ["completed", "completed", "diverged", "diverged"]
    assert {r["status"] for r in first.values() if r["lr"] > 1} == {"diverged"}
    mtimes = {n: (sweep / n / "results.json").stat().st_mtime_ns for n in first}

    again = _train(tmp_path, *grid)
    log = again.stdout + again.stderr
    assert {n: (sweep / n / "results.json").stat().st_mtime_ns for n in first} == mtimes
    assert log.count("already diverged, skipping") == 2
    assert log.count("already completed, skipping") == 2
    for r in first.values():  # the skip line gives the run's scores
        if r["status"] == "completed":
            assert f"best {r['dev']['best']:.4f}, test best {r['test']['best']:.4f}" in log

    _train(tmp_path, *grid, "rerun_diverged=true")
    third = _statuses(sweep)
    assert set(third) == set(first)  # same folders: the override is not in the name
    for name, r in first.items():
        changed = (sweep / name / "results.json").stat().st_mtime_ns != mtimes[name]
        assert changed == (r["status"] == "diverged")
        assert third[name]["status"] == r["status"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_stops_a_parallel_sweep_and_a_rerun_finishes_it_exactly(tmp_path):
    grid = ["trainer.max_epochs=6", "trainer.limit_train_batches=null", "seed=0,1,2",
            "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    reference, sweep = tmp_path / "reference", tmp_path / "sweep"
    _train(tmp_path, *grid, f"hydra.sweep.dir={reference}")

    env = {**os.environ, "BLURB_DATA_DIR": str(FIXTURES),
           "BLURBTUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", *grid,
           f"hydra.sweep.dir={sweep}"]
    with open(tmp_path / "stopped.log", "w") as log:
        parent = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=log)
        try:
            # once a run has trained an epoch (its checkpoint), so that the rerun resumes it
            _wait_for(lambda: any(sweep.glob("*/checkpoints/last.ckpt")), 300, "an epoch's end")
            workers = psutil.Process(parent.pid).children(recursive=True)
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(timeout=300) == 128 + signal.SIGTERM
        finally:
            if parent.poll() is None:
                parent.kill()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"still running after the sweep was stopped: {alive}"
    stopped = _statuses(sweep)
    assert "interrupted" in {r["status"] for r in stopped.values()}
    assert "running" not in {r["status"] for r in stopped.values()}

    _train(tmp_path, *grid, f"hydra.sweep.dir={sweep}")
    finished, expected = _statuses(sweep), _statuses(reference)
    assert set(finished) == set(expected) and len(expected) == 3
    for name, r in finished.items():
        assert r["status"] == "completed"
        assert {k: r[k] for k in COMPARED} == {k: expected[name][k] for k in COMPARED}
        assert prediction_bytes(sweep / name) == prediction_bytes(reference / name)
    assert any(r["resumed_from"] for r in finished.values())


# The second signal's test needs a stop that takes long: in every process of the sweep (a
# sitecustomize on PYTHONPATH), the second epoch's second batch leaves a marker (`READY`) and
# waits, so that the signal lands mid-epoch; the checkpoint then written because the run was
# asked to stop leaves another (`SLOW_STOP`) and sleeps, as a 27 GB write would.
SLOW_STOP = '''
import os, time
if os.environ.get("SLOW_STOP"):
    from blurbtune import checkpoints, module, stopping
    real_step = module.FineTuner.training_step
    def step(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1 and not os.path.exists(os.environ["READY"]):
            open(os.environ["READY"], "w").close()
            time.sleep(5)
        return real_step(self, batch, batch_idx)
    module.FineTuner.training_step = step
    real_save = checkpoints.RunCheckpointIO.save_checkpoint
    def slow(self, *args, **kwargs):
        if stopping.requested() is not None:
            open(os.environ["SLOW_STOP"], "w").close()
            time.sleep(600)
        return real_save(self, *args, **kwargs)
    checkpoints.RunCheckpointIO.save_checkpoint = slow
'''

# One job with two workers (fewer jobs than workers): a stack of two seeds, or one seed.
SHAPES = {"stack": ["seed=0,1", "hydra/sweeper=stacked", "hydra.sweeper.size=2"],
          "single": ["seed=0"]}


def _start_sweep(tmp_path: Path, sweep: Path, shape: str, **env_extra: str) -> tuple:
    grid = ["trainer.max_epochs=6", "trainer.limit_train_batches=null", *SHAPES[shape],
            "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_STOP)
    env = {**os.environ, "BLURB_DATA_DIR": str(FIXTURES),
           "BLURBTUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)]), **env_extra}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", *grid]
    out = open(tmp_path / "stopped.log", "w")  # noqa: SIM115 - closed by the caller's wait
    # Its own session: its group is the sweep's processes alone, as a terminal's would be.
    parent = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=out,
                              start_new_session=True)
    return parent, grid, out


def _stop_and_check(tmp_path, sweep, parent, out, send, second=None) -> str:
    try:
        # once a run has trained an epoch (its checkpoint), so that the rerun resumes it
        _wait_for(lambda: any(sweep.glob("*/checkpoints/last.ckpt")), 300, "an epoch's end")
        workers = psutil.Process(parent.pid).children(recursive=True)
        send()
        if second is not None:
            second()
        code = parent.wait(timeout=300)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        out.close()
    log = (tmp_path / "stopped.log").read_text()
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log and "TerminatedWorkerError" not in log, log[-5000:]
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"still running after the sweep was stopped: {alive}"
    stopped = _statuses(sweep)
    assert stopped and {r["status"] for r in stopped.values()} == {"interrupted"}, stopped
    assert all(r["checkpoint"] for r in stopped.values())
    return log


@pytest.mark.slow
@pytest.mark.parametrize("shape, to", [("stack", "process"), ("single", "process and group")])
def test_one_sigterm_stops_a_sweep_of_fewer_jobs_than_workers_and_the_rerun_resumes(
        tmp_path, shape, to):
    """One job on two workers: the idle worker survives the signal, every run checkpoints and
    records `interrupted`, exit 143, no traceback. "process and group" is what `timeout`
    sends: the signal to the sweep's process, then to its group (each worker gets it twice)."""
    sweep = tmp_path / "sweep"
    parent, grid, out = _start_sweep(tmp_path, sweep, shape)

    def send():
        parent.send_signal(signal.SIGTERM)
        if to == "process and group":
            os.killpg(parent.pid, signal.SIGTERM)

    _stop_and_check(tmp_path, sweep, parent, out, send)
    _train(tmp_path, *grid)
    finished = _statuses(sweep)
    assert len(finished) == len(SHAPES[shape][0].split(","))
    assert all(r["status"] == "completed" and r["resumed_from"] for r in finished.values())


@pytest.mark.slow
def test_a_second_sigterm_ends_a_stopping_sweep_at_once_and_records_it(tmp_path):
    """The first SIGTERM's checkpoint is slow (here: it sleeps 600 s); a second, later one
    ends the sweep in one line, each run recorded `interrupted` with its epoch's checkpoint."""
    sweep, marker, ready = tmp_path / "sweep", tmp_path / "stopping", tmp_path / "ready"
    parent, grid, out = _start_sweep(tmp_path, sweep, "stack", SLOW_STOP=str(marker),
                                     READY=str(ready))

    def first():
        _wait_for(ready.exists, 300, "the second epoch's second batch")
        parent.send_signal(signal.SIGTERM)

    def second():
        _wait_for(marker.exists, 120, "the stop's checkpoint to begin")
        time.sleep(3)  # a new request, not the first one delivered twice
        parent.send_signal(signal.SIGTERM)

    log = _stop_and_check(tmp_path, sweep, parent, out, first, second)
    assert log.count("second SIGTERM: aborting the sweep now") == 1
    _train(tmp_path, *grid)
    assert {r["status"] for r in _statuses(sweep).values()} == {"completed"}
