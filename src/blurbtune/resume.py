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

A stop (SIGTERM, a first Ctrl-C) does not wait for the training step under way: during its
forward and backward passes (`StepStopped`) the step is dropped, and the run saves the state
as of the last completed step, with the loop position that makes the rerun repeat the dropped
batch. The optimizer and scheduler steps, and everything after them, are not interrupted: a
stop that arrives there ends training once the step is complete. A stop writes nothing when the
checkpoint on disk already holds the state it would save.
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
from pytorch_lightning.utilities.exceptions import SIGTERMException

from blurbtune import stopping
from blurbtune.checkpoints import FOLDER, LAST, RunCheckpointIO, best_file, load, remove
from blurbtune.console import epoch_label
from blurbtune.errors import BlurbtuneError
from blurbtune.reproducibility import rng_snapshot, rng_state, set_rng_state
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




class StepStopped(SIGTERMException):
    """A stop that arrived during a training step's forward or backward pass: the step is
    dropped and the run stops as of the last completed one (Lightning handles it as its own
    SIGTERM stop)."""


def _let_signals_in(param: Any) -> None:
    """A gradient hook that does nothing: a Python call between the backward pass's kernels,
    where a pending signal's handler can run (handlers run only between Python bytecodes, and
    on the CPU the backward pass is otherwise one long call)."""


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

    SIGTERM (Lightning's handler) and SIGINT (ours: a first Ctrl-C stops, a second one aborts at
    once) stop training: at once during a step's forward and backward passes (the step is
    dropped, see the module's docstring), else after the step under way. The state is then
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
        # (epoch, batches done) where the checkpoint on disk resumes; None: none yet
        self._on_disk: tuple[int, int] | None = None
        self._in_step = False  # in a step's forward or backward pass, which a stop drops
        self._step_start: dict | None = None  # the RNG states as that step started
        self._hooks: list[Any] = []

    def _save(self, trainer: pl.Trainer, batches_done: int = 0,
              background: bool = True) -> None:
        self._batches_done = batches_done
        self.io.background = background
        # The full state, to resume from (rank 0 only under DDP).
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last = clock()
        self._on_disk = (trainer.current_epoch + (not batches_done), batches_done)
        if not background:
            self.io.wait()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict) -> None:
        # A step dropped by a stop had drawn random numbers: the state as it started is saved.
        start = self._step_start if self._step_start is not None else _rng_states(pl_module)
        checkpoint["blurbtune_resume"] = {"rng": rng_state(start["rng"]),
                                          "epoch": trainer.current_epoch,
                                          "batches_done": self._batches_done}
        records = [{**m.state_dict(), "trained_epoch": pl_module.trained_epoch}
                   for m in pl_module.members]
        if pl_module.stack is None:
            checkpoint["blurbtune"] = records[0]
        else:
            checkpoint["blurbtune_members"] = records
            checkpoint["blurbtune_generators"] = start["generators"]

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
        self._on_disk = (state["epoch"] + (not done), done)
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
        # A stop may drop this step when it can save the state before it (mid-epoch), or
        # when that state needs no saving: on disk already, or nothing trained yet. Not under
        # DDP: a rank that dropped its step would leave the others waiting in its all-reduce.
        here = (trainer.current_epoch, done)
        if trainer.world_size == 1 and (
                done > 0 or trainer.global_step == 0 or self._on_disk == here):
            self._step_start = _rng_states(pl_module)
            self._in_step = True
            if trainer.received_sigterm:  # it came between the steps
                self._drop_step()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._in_step = False  # the module's own hook then records the step's losses

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any,
                                 optimizer: Any) -> None:
        self._in_step = False  # (a step without a backward pass)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._step_start = None

    def _drop_step(self) -> None:
        self._in_step = False
        raise StepStopped

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's SIGTERM handler is set (it restores the handlers it found after
        # fit): each stop signal's handler, then the step under way is dropped if it can be.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._dropping(trainer, signal.getsignal(signum)))
        if pl_module.device.type == "cpu":  # on a GPU the backward pass runs in other threads
            self._hooks = [p.register_post_accumulate_grad_hook(_let_signals_in)
                           for p in pl_module.parameters() if p.requires_grad]

    def _dropping(self, trainer: pl.Trainer, previous: Any) -> Any:
        def handler(signum: int, frame: Any) -> None:
            if callable(previous):
                previous(signum, frame)
            if self._in_step and trainer.received_sigterm:
                self._drop_step()

        return handler

    def _on_sigint(self, trainer: pl.Trainer) -> Any:
        def handler(signum: int, frame: Any) -> None:
            self._sigints += 1
            if self._sigints > 1:  # not received_sigterm: a stopping sweep also sends SIGTERM
                raise KeyboardInterrupt
            log.warning("interrupted: stopping (Ctrl-C again to abort now)")
            trainer._signal_connector.received_sigterm = True

        return handler

    def _end_training(self) -> None:
        self._in_step = False
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_training()
        self.io.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._end_training()
        if isinstance(exception, StepStopped):
            pl_module.zero_grad(set_to_none=True)  # the dropped step's partial gradients
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if trainer.received_sigterm and 0 < done < trainer.num_training_batches \
                and (trainer.current_epoch, done) != self._on_disk \
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


def _rng_states(pl_module: Any) -> dict:
    """The random states a checkpoint keeps: the process's, and a stack's members'."""
    stack = pl_module.stack
    return {"rng": rng_snapshot(),
            "generators": stack.generator_states(pl_module.device) if stack else None}
