"""Checkpoints a run can resume from exactly: end of each epoch, and on SIGTERM/SIGINT.

A checkpoint is Lightning's (model, optimizer, scheduler, loop counters, FineTuner state)
plus what Lightning does not keep: the RNG states and how many batches of the current epoch
were trained. With the training order a function of (data_seed, epoch), that is all a
resumed run needs to continue as if it had never stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from blurbtune.reproducibility import rng_state, set_rng_state

log = logging.getLogger("blurbtune")

FOLDER = "checkpoints"
LAST = "last.ckpt"


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's own checkpoint to resume from, if it left one."""
    path = Path(run_dir) / FOLDER / LAST
    return path if path.is_file() else None


def remove_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / FOLDER, ignore_errors=True)


class FileCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing straight to a local file (atomically: a temporary
    file, then a rename). Lightning's own serialises the whole checkpoint into memory first and
    copies it again to write it: a transient of twice the checkpoint (weights, optimizer state,
    best weights), which set the run's peak memory."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported when saving to a local file")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class Resumable(pl.Callback):
    """Saves `checkpoints/last.ckpt` (atomically) after each epoch's dev evaluation and
    when interrupted.

    SIGTERM (Lightning's handler) and SIGINT (ours: a first Ctrl-C stops after the current
    batch, a second one aborts at once) end training after a complete batch; the state is then
    saved unless the run was validating, in which case the epoch-end checkpoint stands.
    """

    def __init__(self, run_dir: Path, datamodule: Any) -> None:
        self.path = Path(run_dir) / FOLDER / LAST
        self.datamodule = datamodule
        self._validating = False
        self._mid_epoch = False
        self._previous_sigint: Any = None
        self._sigints = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own
            trainer.strategy.checkpoint_io = FileCheckpointIO()

    def _save(self, trainer: pl.Trainer, mid_epoch: bool = False) -> None:
        self._mid_epoch = mid_epoch
        # The full state, to resume from (FileCheckpointIO: atomic, and rank 0 only under DDP).
        trainer.save_checkpoint(self.path, weights_only=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict) -> None:
        checkpoint["blurbtune_resume"] = {
            "rng": rng_state(),
            "epoch": trainer.current_epoch,
            "batches_done": (trainer.fit_loop.epoch_loop.batch_progress.current.completed
                             if self._mid_epoch else 0),
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict) -> None:
        state = checkpoint["blurbtune_resume"]
        set_rng_state(state["rng"])
        done = state["batches_done"]
        if done:
            self.datamodule.resume_at(done)
        # We replay the order ourselves, so Lightning's warning about mid-epoch resume is moot.
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
        log.info("resuming from %s (epoch %d, %d batches done)", self.path, state["epoch"], done)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._validating = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._validating = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)  # after the dev evaluation, where Lightning's ModelCheckpoint saves

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint(trainer))

    def _on_sigint(self, trainer: pl.Trainer) -> Any:
        def handler(signum: int, frame: Any) -> None:
            self._sigints += 1
            if self._sigints > 1:  # not received_sigterm: a stopping sweep also sends SIGTERM
                raise KeyboardInterrupt
            log.warning("interrupted: stopping after this batch (Ctrl-C again to abort now)")
            trainer._signal_connector.received_sigterm = True

        return handler

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore_sigint()
        mid_epoch = 0 < trainer.fit_loop.epoch_loop.batch_progress.current.completed \
            < trainer.num_training_batches
        if trainer.received_sigterm and mid_epoch and not self._validating:
            self._save(trainer, mid_epoch=True)
            log.warning("interrupted: state saved in %s; run the same command to resume",
                        self.path)
