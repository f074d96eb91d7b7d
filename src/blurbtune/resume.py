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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from blurbtune import stopping
from blurbtune.io import writing
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


SET_ASIDE = "set-aside"  # a run folder's damaged files, kept for the user to look at


class DamagedCheckpoint(Exception):  # noqa: N818 (a state of a file, reported in one line)
    """A checkpoint that cannot be read back: the message says which and why."""


@dataclass(frozen=True)
class Position:
    """Where a checkpoint stands: epoch, optimizer steps, batches of the epoch done."""

    epoch: int
    step: int
    batches_done: int


def position(path: Path) -> Position:
    """The position a checkpoint resumes from, read without loading its tensors into memory.
    Raises DamagedCheckpoint when the file is truncated or not a blurbtune checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        state = checkpoint["blurbtune_resume"]
        return Position(int(checkpoint["epoch"]), int(checkpoint["global_step"]),
                        int(state["batches_done"]))
    except Exception as e:  # noqa: BLE001 - zip, pickle and key errors alike mean damaged
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedCheckpoint(f"{path}: unreadable ({first})") from None


def set_aside(run_dir: Path, names: tuple[str, ...] = ("checkpoints", "results.json",
                                                       "metrics.csv")) -> Path:
    """Move a run's damaged checkpoint, with the record it belonged to, into
    `set-aside/<time>/`: nothing recorded is deleted, and the run can start again."""
    target = Path(run_dir) / SET_ASIDE / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = Path(run_dir) / name
        if source.exists():
            os.replace(source, target / name)
    return target


def slice_checkpoint(checkpoint: dict, stacked: set[str], k: int, device_type: str) -> dict:
    """Member k's checkpoint from a stack's, in the form a single run of its seed writes (so
    it resumes alone or in any stack at the same position)."""
    out = {key: value for key, value in checkpoint.items()
           if key not in ("blurbtune_members", "blurbtune_generators")}
    out["state_dict"] = {key: (t[k] if key.removeprefix("model.") in stacked else t)
                         for key, t in checkpoint["state_dict"].items()}
    out["optimizer_states"] = [_slice_optimizer(o, k) for o in checkpoint["optimizer_states"]]
    out["blurbtune"] = checkpoint["blurbtune_members"][k]
    resume = dict(checkpoint["blurbtune_resume"])
    rng = dict(resume["rng"])
    generator = checkpoint["blurbtune_generators"][k]
    if device_type == "cuda":
        rng["cuda"] = [generator]
    else:
        rng["torch"] = generator
    resume["rng"] = rng
    out["blurbtune_resume"] = resume
    return out


def _slice_optimizer(state: dict, k: int) -> dict:
    return {**state, "state": {i: {name: (v[k] if torch.is_tensor(v) and v.dim() else v)
                                   for name, v in per_param.items()}
                               for i, per_param in state["state"].items()}}


def merge_checkpoints(checkpoints: list[dict], stacked: set[str], device_type: str) -> dict:
    """A stack's checkpoint from its members' (as `slice_checkpoint` wrote them)."""
    first = checkpoints[0]
    out = {key: value for key, value in first.items() if key != "blurbtune"}
    out["state_dict"] = {
        key: (torch.stack([c["state_dict"][key] for c in checkpoints])
              if key.removeprefix("model.") in stacked else t)
        for key, t in first["state_dict"].items()}
    out["optimizer_states"] = [
        {**state, "state": {i: {name: (torch.stack([c["optimizer_states"][j]["state"][i][name]
                                                    for c in checkpoints])
                                       if torch.is_tensor(v) and v.dim() else v)
                                for name, v in per_param.items()}
                            for i, per_param in state["state"].items()}}
        for j, state in enumerate(first["optimizer_states"])]
    out["blurbtune_members"] = [c["blurbtune"] for c in checkpoints]
    rngs = [c["blurbtune_resume"]["rng"] for c in checkpoints]
    out["blurbtune_generators"] = [r["cuda"][0] if device_type == "cuda" else r["torch"]
                                   for r in rngs]
    return out


class StackCheckpointIO(CheckpointIO):
    """The checkpoint writer of a stack: Lightning saves and loads one checkpoint; on disk it is
    each member's own `checkpoints/last.ckpt` in its run folder (`slice_checkpoint`), written
    atomically, so a member resumes alone or in a stack, and a finished member's folder holds
    nothing of the others."""

    def __init__(self, folders: list[Path], stacked: set[str], alive: Any,
                 device_type: str) -> None:
        self.folders, self.stacked, self.alive = list(folders), stacked, alive
        self.device_type = device_type
        self.inner = FileCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        for k in self.alive():  # a diverged member's result is final: nothing to resume
            member = slice_checkpoint(checkpoint, self.stacked, k, self.device_type)
            self.inner.save_checkpoint(member, Path(self.folders[k]) / FOLDER / LAST)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        checkpoints = [self.inner.load_checkpoint(Path(f) / FOLDER / LAST, map_location,
                                                  weights_only=False) for f in self.folders]
        return merge_checkpoints(checkpoints, self.stacked, self.device_type)

    def remove_checkpoint(self, path: Any) -> None:
        for folder in self.folders:
            remove_checkpoints(folder)

    def teardown(self) -> None:
        pass


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
        try:
            with writing(path):  # torch's zip writer says a full disk as a RuntimeError
                torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:  # a full disk: no half-written file left to keep it full
            tmp.unlink(missing_ok=True)
            raise


class Resumable(pl.Callback):
    """Saves `checkpoints/last.ckpt` (atomically) after each epoch's dev evaluation and
    when interrupted.

    SIGTERM (Lightning's handler) and SIGINT (ours: a first Ctrl-C stops after the current
    batch, a second one aborts at once) end training after a complete batch; the state is then
    saved unless the run was validating, in which case the epoch-end checkpoint stands.
    """

    def __init__(self, run_dir: Path, datamodule: Any, every: int = 1) -> None:
        self.path = Path(run_dir) / FOLDER / LAST
        self.datamodule = datamodule
        self.every = every  # epochs between checkpoints; 0: only when stopped
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
        # After the dev evaluation, where Lightning's ModelCheckpoint saves.
        if self.every and (trainer.current_epoch + 1) % self.every == 0:
            self._save(trainer)

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
        if trainer.received_sigterm and mid_epoch and not self._validating \
                and not stopping.aborting():  # a second signal: stop now, no checkpoint
            self._save(trainer, mid_epoch=True)
            log.warning("interrupted: state saved in %s; run the same command to resume",
                        self.path)
