"""A run killed mid-training and restarted ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from tiny_runs import needs_fixtures, prediction_bytes, tiny_config

from blurbtune.module import FineTuner
from blurbtune.run import run

pytestmark = needs_fixtures

# 16 train examples in batches of 4: 4 batches an epoch; interrupt in the middle of epoch 2.
OVERRIDES = ("trainer.max_epochs=3",)
STOP_EPOCH, STOP_BATCH = 1, 1
COMPARED = ("dev", "test", "history", "best_epoch", "epochs_run", "collapsed")


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


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def _assert_same_run(resumed, uninterrupted):
    a, b = _results(resumed), _results(uninterrupted)
    assert a["status"] == "completed"
    assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    assert prediction_bytes(resumed) == prediction_bytes(uninterrupted)


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
    assert _results(tmp_path)["status"] == "interrupted"
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["blurbtune_resume"]["batches_done"] == STOP_BATCH + 1  # mid-epoch position

    run(cfg)  # the same command again: resumes without being told where from
    assert _results(tmp_path)["resumed_from"].endswith("last.ckpt")
    _assert_same_run(tmp_path, uninterrupted)
    assert not (tmp_path / "checkpoints").exists()


def test_a_crash_resumes_from_the_last_epoch_end_checkpoint(
        tmp_path, cache, uninterrupted, monkeypatch):
    cfg = tiny_config(tmp_path, cache, *OVERRIDES)
    with monkeypatch.context() as m:
        _interrupt_with(m, _crash)
        with pytest.raises(RuntimeError, match="node lost"):
            run(cfg)
    assert _results(tmp_path)["status"] == "failed"
    run(cfg)
    assert _results(tmp_path)["resumed_from"]
    _assert_same_run(tmp_path, uninterrupted)


def test_the_uninterrupted_run_does_change_between_epochs(uninterrupted):
    """Resume equality means something: training moves the predictions epoch to epoch."""
    history = [h["dev"] for h in _results(uninterrupted)["history"]]
    assert len(history) == 3 and len(set(history)) > 1


def test_keep_checkpoints_keeps_the_last_checkpoint(tmp_path, cache):
    run(tiny_config(tmp_path, cache, "keep_checkpoints=true"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert _results(tmp_path)["resumed_from"] is None


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
    assert _results(tmp_path)["resumed_from"].endswith("last.ckpt")
    _assert_same_run(tmp_path, uninterrupted_lora)
    history = [h["dev"] for h in _results(uninterrupted_lora)["history"]]
    assert len(set(history)) > 1  # the adapters did train: equality means something


def test_checkpoint_every_n_epochs_and_only_when_stopped(tmp_path, cache, monkeypatch):
    """checkpoint_every=2 saves after epochs 2, 4...; 0 saves at no epoch's end (only when a
    signal stops the run, which the tests above exercise)."""
    from blurbtune import resume

    saved = []
    original = resume.Resumable._save

    def counting(self, trainer, mid_epoch=False):
        saved.append((trainer.current_epoch, mid_epoch))
        original(self, trainer, mid_epoch)

    monkeypatch.setattr(resume.Resumable, "_save", counting)
    run(tiny_config(tmp_path / "two", cache, "trainer.max_epochs=3", "checkpoint_every=2"))
    assert saved == [(1, False)]
    saved.clear()
    run(tiny_config(tmp_path / "none", cache, "trainer.max_epochs=3", "checkpoint_every=0"))
    assert saved == []
