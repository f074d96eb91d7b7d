"""A stop does not wait for the training step under way (issue 26, item 2): SIGTERM during a
step's forward or backward pass drops that step, the run saves the state as of the last
completed step (with the position that repeats the dropped batch), and the rerun ends as the
uninterrupted run. Counted, not timed: the optimizer steps taken and the step the checkpoint
records equal the steps completed before the signal. A stop writes only what changed since
the last checkpoint."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from test_resume import OVERRIDES
from tiny_runs import assert_same_run, needs_fixtures, run_results, tiny_config

from blurbtune import checkpoints
from blurbtune.module import FineTuner
from blurbtune.run import run

pytestmark = needs_fixtures

# 16 train examples in batches of 4: 4 batches an epoch. The signal comes during the third
# step of the second epoch, after 4 + 2 completed steps.
STACK = ("task=hoc", "trainer.max_epochs=3", "optimizer.lr=1e-3", "stack=[0,1]")
STOP_EPOCH, STOP_BATCH = 1, 2
STEPS_BEFORE = 4 * STOP_EPOCH + STOP_BATCH


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(tiny_config(out, cache, *OVERRIDES))
    return out


@pytest.fixture(scope="module")
def uninterrupted_stack(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted-stack")
    run(tiny_config(out, cache, *STACK))
    return out


def _signal_during(monkeypatch, where: str, epoch: int = STOP_EPOCH,
                   batch: int = STOP_BATCH) -> list[int]:
    """SIGTERM to this process in the middle of step `batch` of `epoch`: from a forward hook
    on the second encoder layer, or from a gradient hook on the first layer's query weight
    (one of the last gradients the backward pass computes). Returns the list that counts the
    optimizer steps completed."""
    steps: list[int] = []
    original_start, original_step = FineTuner.on_train_start, FineTuner.optimizer_step

    def at_the_step(module: FineTuner) -> bool:
        progress = module.trainer.fit_loop.epoch_loop.batch_progress.current
        return (module.training and module.current_epoch == epoch
                and progress.completed == batch)

    def send(module: FineTuner) -> None:
        if at_the_step(module):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_start(self):
        original_start(self)
        if where == "forward":
            layer = dict(self.model.named_modules())["bert.encoder.layer.1"]
            layer.register_forward_pre_hook(lambda *_: send(self))
        else:
            weight = dict(self.model.named_parameters())[
                "bert.encoder.layer.0.attention.self.query.weight"]
            weight.register_post_accumulate_grad_hook(lambda _: send(self))

    def optimizer_step(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        steps.append(self.global_step)

    monkeypatch.setattr(FineTuner, "on_train_start", on_train_start)
    monkeypatch.setattr(FineTuner, "optimizer_step", optimizer_step)
    return steps


def _assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    assert run_results(resumed)["resumed_from"]
    assert_same_run(resumed, uninterrupted)


def _stopped(cfg, monkeypatch, where: str, **at) -> list[int]:
    with monkeypatch.context() as m:
        steps = _signal_during(m, where, **at)
        with pytest.raises(SystemExit) as stopped:
            run(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    return steps


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_stop_during_a_step_drops_it_and_the_rerun_ends_as_the_uninterrupted_run(
        tmp_path, cache, uninterrupted, monkeypatch, where):
    cfg = tiny_config(tmp_path, cache, *OVERRIDES)
    steps = _stopped(cfg, monkeypatch, where)
    assert len(steps) == STEPS_BEFORE  # the step under way was not taken
    assert run_results(tmp_path)["status"] == "interrupted"
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == STEPS_BEFORE
    assert saved["blurbtune_resume"]["batches_done"] == STOP_BATCH  # the dropped one again
    assert saved["blurbtune"]["loss_since_eval"][1] == STOP_BATCH  # its loss not counted

    run(cfg)
    _assert_same_run(tmp_path, uninterrupted)


def test_a_stack_stopped_during_a_backward_pass_resumes_to_the_uninterrupted_stack(
        tmp_path, cache, uninterrupted_stack, monkeypatch):
    cfg = tiny_config(tmp_path, cache, *STACK)
    steps = _stopped(cfg, monkeypatch, "backward")
    assert len(steps) == STEPS_BEFORE
    for seed in (0, 1):
        saved = torch.load(tmp_path / f"seed={seed}" / "checkpoints" / "last.ckpt",
                           weights_only=True)
        assert (saved["global_step"], saved["blurbtune_resume"]["batches_done"]) == (
            STEPS_BEFORE, STOP_BATCH)
    run(cfg)
    for seed in (0, 1):
        _assert_same_run(tmp_path / f"seed={seed}", uninterrupted_stack / f"seed={seed}")


def _recording_writes(monkeypatch) -> list[str]:
    written: list[str] = []
    real = checkpoints.write_atomic

    def recording(obj, path):  # a background write (an epoch end's) is marked as such
        main = threading.current_thread() is threading.main_thread()
        written.append(Path(path).name if main else f"background:{Path(path).name}")
        real(obj, path)

    monkeypatch.setattr(checkpoints, "write_atomic", recording)
    return written


def _writes_after_the_signal(monkeypatch, written: list[str]) -> list[str]:
    """Marks in `written` when the signal is sent (the stop's writes follow the mark)."""
    real_kill = os.kill

    def kill(pid, signum):
        written.append("|signal|")
        real_kill(pid, signum)

    monkeypatch.setattr(os, "kill", kill)
    return written


def _after_signal(written: list[str]) -> list[str]:
    """What the stop wrote: in the main thread, after the signal."""
    return [n for n in written[written.index("|signal|") + 1:]
            if not n.startswith("background:")]


def test_with_best_weights_on_disk_the_stop_writes_only_last_ckpt(tmp_path, cache,
                                                                   monkeypatch):
    """checkpoint_every=1 wrote epoch 0's checkpoint and best weights at its end; a stop in
    epoch 1 writes the new position (last.ckpt) and no best-weights file."""
    cfg = tiny_config(tmp_path, cache, *OVERRIDES, "checkpoint_every=1")
    written = _recording_writes(monkeypatch)
    _writes_after_the_signal(monkeypatch, written)
    _stopped(cfg, monkeypatch, "forward")
    assert [n for n in written[:written.index("|signal|")] if "best-" in n]
    assert _after_signal(written) == ["last.ckpt"]


def test_a_stop_in_the_first_step_after_an_epoch_end_checkpoint_writes_nothing(
        tmp_path, cache, uninterrupted, monkeypatch):
    """The checkpoint written at epoch 0's end is the state before epoch 1's first step: a
    stop during that step drops it and has nothing new to write."""
    cfg = tiny_config(tmp_path, cache, *OVERRIDES, "checkpoint_every=1")
    written = _recording_writes(monkeypatch)
    _writes_after_the_signal(monkeypatch, written)
    steps = _stopped(cfg, monkeypatch, "forward", batch=0)
    assert len(steps) == 4 * STOP_EPOCH
    assert _after_signal(written) == []
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["blurbtune_resume"]["batches_done"]) == (4, 0)
    run(cfg)
    _assert_same_run(tmp_path, uninterrupted)


# ---------------------------------------------------------------- a parallel sweep's worker

ROOT = Path(__file__).resolve().parents[1]
# In every process of the sweep (a sitecustomize on PYTHONPATH): the second epoch's second step
# leaves a marker and sleeps inside its forward pass, long enough that only a stop that drops
# the step ends it in time.
SLOW_STEP = '''
import os, time
if os.environ.get("SLOW_STEP"):
    from blurbtune import module
    real_forward = module.FineTuner.forward
    def forward(self, batch):
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        if self.training and self.current_epoch == 1 and progress.completed == 1:
            open(os.environ["SLOW_STEP"], "w").close()
            time.sleep(600)
        return real_forward(self, batch)
    module.FineTuner.forward = forward
'''


@pytest.mark.slow
def test_a_parallel_sweeps_worker_drops_the_step_under_way(tmp_path):
    """One stacked job on two workers (the loky path of stopping.py): SIGTERM to the sweep
    while a worker's step is in its forward pass; the worker drops the step, checkpoints the
    stack as of the 5 steps completed and the sweep exits 143; the rerun resumes each run to
    the end, equal to the sweep that was never stopped."""
    import subprocess
    import sys
    import time

    from tiny_runs import FIXTURES

    grid = ["trainer.max_epochs=3", "trainer.limit_train_batches=null", "seed=0,1",
            "hydra/sweeper=stacked", "hydra.sweeper.size=2", "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2"]
    site, marker = tmp_path / "site", tmp_path / "in-step"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_STEP)
    env = {**os.environ, "BLURB_DATA_DIR": str(FIXTURES), "OMP_NUM_THREADS": "1",
           "BLURBTUNE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)])}

    def sweep(folder: Path, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", *grid,
             f"hydra.sweep.dir={folder}"], cwd=tmp_path, env={**env, **extra},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its own group: the sweep's processes alone

    reference = sweep(tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]
    stopped = tmp_path / "sweep"
    parent = sweep(stopped, SLOW_STEP=str(marker))
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert parent.poll() is None and time.monotonic() < deadline, parent.stdout.read()
            time.sleep(0.1)
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=120)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    log = parent.stdout.read()
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    runs = sorted(p.parent for p in stopped.glob("*/results.json"))
    assert len(runs) == 2
    for run_dir in runs:
        assert run_results(run_dir)["status"] == "interrupted"
        saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert (saved["global_step"], saved["blurbtune_resume"]["batches_done"]) == (5, 1)

    rerun = sweep(stopped)
    assert rerun.wait(timeout=600) == 0, rerun.stdout.read()[-3000:]
    for run_dir in runs:
        _assert_same_run(run_dir, tmp_path / "reference" / run_dir.name)
