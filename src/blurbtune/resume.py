"""Checkpoints a run can resume from exactly: when `checkpoint_every` says, and on SIGTERM/SIGINT.

A checkpoint is Lightning's (model, optimizer, scheduler, loop counters) plus what Lightning
does not keep: each run's record so far (`module.Member`), the RNG states and how many batches
of the current epoch were trained. With the training order a function of (data_seed, epoch),
that is all a resumed run needs to continue as if it had never stopped. What is on disk, and
how it is written and read, is `blurbtune.checkpoints`.

`checkpoint_every` (checked in `settings`): N epochs (0: only when stopped), a time such as
`30min` (at the first batch boundary once that much time has passed since the last
checkpoint, so a hard kill loses at most about that), or `auto` (the default): each epoch's
end while writing a checkpoint takes no longer than an epoch, else every 30 minutes; and
within an epoch longer than 30 minutes, every 30 minutes. Checkpoints during training are
written in the background (`RunCheckpointIO.background`); the one written when a run is
stopped is waited for.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from blurbtune import stopping
from blurbtune.checkpoints import FOLDER, LAST, RunCheckpointIO, best_file, load, remove
from blurbtune.console import epoch_label
from blurbtune.errors import BlurbtuneError
from blurbtune.reproducibility import rng_state, set_rng_state
from blurbtune.settings import checkpoint_interval

log = logging.getLogger("blurbtune")

clock = time.monotonic  # the time that `checkpoint_every`'s durations count (tests replace it)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's own checkpoint to resume from, if it left one."""
    path = Path(run_dir) / FOLDER / LAST
    return path if path.is_file() else None


def remove_checkpoints(run_dir: Path) -> None:
    remove(run_dir)


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
    Raises DamagedCheckpoint when the file is truncated, not a blurbtune checkpoint or its
    best weights are missing; UnsafeCheckpoint (exit 2) when its pickle would run code."""
    try:
        checkpoint = load(path, mmap=True)
        state = checkpoint["blurbtune_resume"]
        best = best_file(path, checkpoint)
        if best is not None and not best.is_file():
            raise FileNotFoundError(f"its best weights {best.name} are missing")
        return Position(int(checkpoint["epoch"]), int(checkpoint["global_step"]),
                        int(state["batches_done"]))
    except Exception as e:  # noqa: BLE001 - zip, pickle and key errors alike mean damaged
        if isinstance(e, BlurbtuneError):  # refused, not damaged: said as it is
            raise
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




@dataclass
class Schedule:
    """When to checkpoint during training, from `checkpoint_every` (see the module's
    docstring): pure decisions on times in seconds."""

    kind: str  # "epochs", "seconds" or "auto"
    amount: float  # epochs between checkpoints, or seconds

    def at_epoch_end(self, epoch: int, since_last: float, epoch_s: float,
                     write_s: float | None) -> bool:
        if self.kind == "epochs":
            return bool(self.amount) and (epoch + 1) % int(self.amount) == 0
        if self.kind == "auto" and (write_s is None or write_s <= epoch_s):
            return True
        return since_last >= self.amount

    def mid_epoch(self, since_last: float) -> bool:
        return self.kind != "epochs" and since_last >= self.amount


class Resumable(pl.Callback):
    """Saves `checkpoints/last.ckpt` as `checkpoint_every` says (at an epoch's end after its dev
    evaluation, or between batches) and when interrupted; keeps each run's record in it.

    SIGTERM (Lightning's handler) and SIGINT (ours: a first Ctrl-C stops after the current
    batch, a second one aborts at once) end training after a complete batch; the state is then
    saved unless the run was validating, in which case the latest checkpoint stands.
    """

    def __init__(self, run_dir: Path, datamodule: Any, io: RunCheckpointIO,
                 every: Any = "auto") -> None:
        self.path = Path(run_dir) / FOLDER / LAST
        self.datamodule, self.io = datamodule, io
        self.schedule = Schedule(*checkpoint_interval(every))
        self._batches_done = 0
        self._validating = False
        self._last = self._epoch_start = clock()
        self._previous_sigint: Any = None
        self._sigints = 0

    def _save(self, trainer: pl.Trainer, batches_done: int = 0,
              background: bool = True) -> None:
        self._batches_done = batches_done
        self.io.background = background
        # The full state, to resume from (rank 0 only under DDP).
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last = clock()
        if not background:
            self.io.wait()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict) -> None:
        checkpoint["blurbtune_resume"] = {"rng": rng_state(), "epoch": trainer.current_epoch,
                                          "batches_done": self._batches_done}
        records = [{**m.state_dict(), "trained_epoch": pl_module.trained_epoch}
                   for m in pl_module.members]
        if pl_module.stack is None:
            checkpoint["blurbtune"] = records[0]
        else:
            checkpoint["blurbtune_members"] = records
            checkpoint["blurbtune_generators"] = pl_module.stack.generator_states(
                pl_module.device)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict) -> None:
        states = checkpoint.get("blurbtune_members") or [checkpoint.get("blurbtune", {})]
        for member, record in zip(pl_module.members, states, strict=True):
            member.load_state_dict(record)
        pl_module.trained_epoch = states[0].get("trained_epoch", 0)
        if pl_module.stack is not None and checkpoint.get("blurbtune_generators"):
            pl_module.stack.pending_states = checkpoint["blurbtune_generators"]
        state = checkpoint["blurbtune_resume"]
        set_rng_state(state["rng"])
        done = state["batches_done"]
        if done:
            self.datamodule.resume_at(done)
        # We replay the order ourselves, so Lightning's warning about mid-epoch resume is moot.
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
        where = epoch_label(state["epoch"], trainer.max_epochs)  # as the bars count, from 1
        log.info("resuming from %s (%s)", self.path,
                 f"{where}, {done} batches done" if done else f"after {where}")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._validating = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._validating = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._epoch_start = clock()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        # Between two batches: the state a SIGTERM after the previous batch would save.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if 0 < done < trainer.num_training_batches and self.schedule.mid_epoch(
                clock() - self._last):
            self._save(trainer, batches_done=done)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the dev evaluation, where Lightning's ModelCheckpoint saves.
        now = clock()
        if self.schedule.at_epoch_end(trainer.current_epoch, now - self._last,
                                      now - self._epoch_start,
                                      self.io.write_seconds):
            self._save(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = clock()
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
        self.io.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore_sigint()
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if trainer.received_sigterm and 0 < done < trainer.num_training_batches \
                and not self._validating \
                and not stopping.aborting():  # a second signal: stop now, no checkpoint
            self._save(trainer, batches_done=done, background=False)
            log.warning("interrupted: state saved in %s; run the same command to resume",
                        self.path)
        else:
            try:
                self.io.wait()  # what a background write had under way, kept
            except Exception as e:  # noqa: BLE001 - the exception that stopped the run comes first
                log.warning("the checkpoint being written when the run stopped failed: %s", e)
