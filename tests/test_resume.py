"""A run killed mid-training and restarted ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import assert_same_run, needs_fixtures, run_results, tiny_config

from blurbtune.module import FineTuner
from blurbtune.run import run

pytestmark = needs_fixtures

# 16 train examples in batches of 4: 4 batches an epoch; interrupt in the middle of epoch 2.
OVERRIDES = ("trainer.max_epochs=3",)
STOP_EPOCH, STOP_BATCH = 1, 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(tiny_config(out, cache, *OVERRIDES))
    return out


def _interrupt_with(monkeypatch, action):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.current_epoch == STOP_EPOCH and batch_idx == STOP_BATCH:
            action()

    monkeypatch.setattr(FineTuner, "on_train_batch_end", on_train_batch_end)


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def _crash():
    raise RuntimeError("node lost")


def test_sigterm_saves_a_mid_epoch_checkpoint_and_the_rerun_resumes_exactly(
        tmp_path, cache, uninterrupted, monkeypatch):
    cfg = tiny_config(tmp_path, cache, *OVERRIDES)
    with monkeypatch.context() as m:
        _interrupt_with(m, _sigterm)
        with pytest.raises(SystemExit) as stopped:
            run(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert run_results(tmp_path)["status"] == "interrupted"
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["blurbtune_resume"]["batches_done"] == STOP_BATCH + 1  # mid-epoch position

    run(cfg)  # the same command again: resumes without being told where from
    assert run_results(tmp_path)["resumed_from"].endswith("last.ckpt")
    assert_same_run(tmp_path, uninterrupted)
    assert not (tmp_path / "checkpoints").exists()


def test_a_crash_resumes_from_the_last_epoch_end_checkpoint(
        tmp_path, cache, uninterrupted, monkeypatch):
    cfg = tiny_config(tmp_path, cache, *OVERRIDES)
    with monkeypatch.context() as m:
        _interrupt_with(m, _crash)
        with pytest.raises(RuntimeError, match="node lost"):
            run(cfg)
    assert run_results(tmp_path)["status"] == "failed"
    run(cfg)
    assert run_results(tmp_path)["resumed_from"]
    assert_same_run(tmp_path, uninterrupted)


def test_the_uninterrupted_run_does_change_between_epochs(uninterrupted):
    """Resume equality means something: training moves the predictions epoch to epoch."""
    history = [h["dev"] for h in run_results(uninterrupted)["history"]]
    assert len(history) == 3 and len(set(history)) > 1


def test_keep_checkpoints_keeps_the_last_checkpoint(tmp_path, cache):
    run(tiny_config(tmp_path, cache, "keep_checkpoints=true"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert run_results(tmp_path)["resumed_from"] is None


@pytest.fixture(scope="module")
def uninterrupted_lora(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted-lora")
    run(tiny_config(out, cache, *OVERRIDES, "stabilizer=lora"))
    return out


def test_a_lora_run_interrupted_mid_epoch_resumes_exactly(
        tmp_path, cache, uninterrupted_lora, monkeypatch):
    """The adapters are rebuilt from init_seed on the rerun, and the checkpoint (adapters,
    head, optimizer state, RNG, position in the epoch) restores the rest."""
    cfg = tiny_config(tmp_path, cache, *OVERRIDES, "stabilizer=lora")
    with monkeypatch.context() as m:
        _interrupt_with(m, _sigterm)
        with pytest.raises(SystemExit):
            run(cfg)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(".lora_A.default." in key for key in saved["state_dict"])
    assert saved["blurbtune_resume"]["batches_done"] == STOP_BATCH + 1

    run(cfg)
    assert run_results(tmp_path)["resumed_from"].endswith("last.ckpt")
    assert_same_run(tmp_path, uninterrupted_lora)
    history = [h["dev"] for h in run_results(uninterrupted_lora)["history"]]
    assert len(set(history)) > 1  # the adapters did train: equality means something


def test_checkpoint_every_n_epochs_and_only_when_stopped(tmp_path, cache, monkeypatch):
    """checkpoint_every=2 saves after epochs 2, 4...; 0 saves at no epoch's end (only when a
    signal stops the run, which the tests above exercise)."""
    from blurbtune import resume

    saved = []
    original = resume.Resumable._save

    def counting(self, trainer, batches_done=0, background=True):
        saved.append((trainer.current_epoch, batches_done > 0))
        original(self, trainer, batches_done, background)

    monkeypatch.setattr(resume.Resumable, "_save", counting)
    run(tiny_config(tmp_path / "two", cache, "trainer.max_epochs=3", "checkpoint_every=2"))
    assert saved == [(1, False)]
    saved.clear()
    run(tiny_config(tmp_path / "none", cache, "trainer.max_epochs=3", "checkpoint_every=0"))
    assert saved == []


KILLED = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from tiny_runs import tiny_config
from blurbtune import resume
from blurbtune.module import FineTuner
from blurbtune.run import run

now = [0.0]
resume.clock = lambda: now[0]  # a minute a batch


def on_train_batch_end(self, outputs, batch, batch_idx):
    now[0] += 60.0
    if self.current_epoch == 1 and batch_idx == 2:
        self.trainer.strategy.checkpoint_io.wait()  # the timed checkpoint is on disk
        os.kill(os.getpid(), signal.SIGKILL)  # no handler runs: what an OOM kill does


FineTuner.on_train_batch_end = on_train_batch_end
run(tiny_config(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]))
"""


def test_a_sigkill_loses_only_the_time_since_the_timed_checkpoint(tmp_path, cache,
                                                                   uninterrupted):
    """checkpoint_every=2min, a batch taking a minute: checkpoints between batches 2 and 3 of
    each epoch (in the background) and at epoch 0's end. SIGKILL after batch 3 of epoch 1; the
    rerun resumes from batch 2 of epoch 1 and ends as the uninterrupted run."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    overrides = (*OVERRIDES, "checkpoint_every=2min")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, str(script), str(out), str(cache), *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert run_results(out)["status"] == "running"  # nothing recorded the kill
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["blurbtune_resume"]["batches_done"]) == (1, 2)

    run(tiny_config(out, cache, *overrides))
    assert run_results(out)["resumed_from"].endswith("last.ckpt")
    assert_same_run(out, uninterrupted)
