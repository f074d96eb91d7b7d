"""Stopping a sweep: SIGTERM or Ctrl-C to the command stops every run after it checkpoints.

With `hydra/launcher=parallel` the runs train in joblib (loky) worker processes. Left alone, a
signal to the launching process kills it and nothing else: its workers train on, orphaned. Here
the launching process forwards the signal to its workers and waits for them; each worker's
running run stops as a single run does (the step under way dropped, or completed where it
cannot be: `resume.Resumable`), checkpoints and records `interrupted`, and the runs not yet
started are not started. The command
then exits with 128 + the signal's number; the same command again resumes.

Every worker handles the signal from the moment it starts (an initializer of the pool, which is
registered as joblib's "loky" backend for the sweep), not only once it runs a job: a worker
that has no job yet, when there are fewer jobs than workers, would die of it, and loky would
end the whole pool (TerminatedWorkerError).

A signal that arrives within `SAME_STOP` seconds of the first is the same request delivered
twice (`timeout` signals the process and then its group; a signal to the group reaches the
workers both directly and through the launching process). A later second signal aborts: each
worker's run stops at once, without the checkpoint of this moment (its last one stands), and
records `interrupted`; the launching process says so in one line and exits when they have, or
after `ABORT_WAIT` seconds, whichever comes first. A third ends it at once.

Why the workers do not simply exit: loky kills every other worker when one dies, so a worker
that stopped must stay alive, idle, until the pool shuts down with the launching process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("blurbtune")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_STOP = 2.0  # seconds within which a signal repeats the first one
ABORT_WAIT = 20.0  # seconds the launching process waits, after a second signal, for its workers
_requested: int | None = None  # the signal that asked this process to stop
_requested_at = 0.0  # when (time.monotonic())
_aborting = False  # a second signal came: stop now, without a checkpoint
_abortable = False  # a run's work is under way in this process (not its recording)
_pool_worker = False  # this process is a joblib worker of a sweep


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _requested


def request(signum: int) -> None:
    """Ask this process to stop: the running run stops at its next batch, no new run starts."""
    global _requested, _requested_at
    if _requested is None:
        _requested, _requested_at = int(signum), time.monotonic()


def _again() -> bool:
    """Whether a signal arriving now, after the first, is a new request (not the same one)."""
    return _requested is not None and time.monotonic() - _requested_at >= SAME_STOP


def aborting() -> bool:
    """Whether a second signal asked this process to stop at once, without a checkpoint."""
    return _aborting


class Stopped(KeyboardInterrupt):
    """A run of a process asked to stop, stopped before it trained."""


class Aborted(KeyboardInterrupt):
    """A run of a sweep worker stopped at once by a second signal."""


def check() -> None:
    """Raise `Stopped` when this process has been asked to stop."""
    if _requested is not None:
        raise Stopped(f"{signal.Signals(_requested).name} before training started")


def in_pool_worker() -> bool:
    """Whether runs in this process must return when interrupted, not end the process."""
    return _pool_worker


def _is_joblib(config: Any) -> bool:
    target = str(config.hydra.launcher.get("_target_", ""))
    return target.endswith("JoblibLauncher")


def _on_launcher_signal(signum: int, frame: Any) -> None:
    global _aborting
    name = signal.Signals(signum).name
    if _requested is not None:
        if not _again():
            return
        if _aborting:
            os._exit(128 + signum)
        _aborting = True
        log.warning("second %s: aborting the sweep now; each run records that it was interrupted "
                    "(its last checkpoint stands; send it again to end at once)", name)
        _forward()
        timer = threading.Timer(ABORT_WAIT, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()
        return
    request(signum)
    workers = _forward()
    if not workers:  # no run under way (the pool is not up yet, or the sweep is over)
        raise SystemExit(128 + signum)
    log.warning("%s: stopping the sweep; %d worker(s) stop their runs and checkpoint, runs "
                "not started are skipped (send it again to abort at once)",
                name, workers)


def _forward() -> int:
    """Send SIGTERM to the sweep's workers; returns how many there were."""
    workers = multiprocessing.active_children()
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(worker.pid, signal.SIGTERM)
    return len(workers)


def _on_worker_signal(signum: int, frame: Any) -> None:
    # Lightning's own SIGTERM handler runs beside this one while a run trains (it chains to it)
    # and stops the run's training (resume.Resumable); outside training, it stops at its next
    # check.
    global _aborting
    if _requested is None:
        request(signum)
    elif _again() and not _aborting:
        _aborting = True
        if _abortable:  # not while waiting for a job (loky would break) or recording a stop
            raise Aborted(f"second {signal.Signals(signum).name}: stopped at once")


@contextlib.contextmanager
def abortable() -> Any:
    """Around a run's work: in a sweep worker a second signal stops it here, at once."""
    global _abortable
    _abortable = True
    try:
        yield
    finally:
        _abortable = False


def _init_worker() -> None:
    """In each worker of the sweep's pool, as it starts (and before its first job)."""
    global _pool_worker
    if not _pool_worker:
        _pool_worker = True
        for signum in SIGNALS:
            signal.signal(signum, _on_worker_signal)


def _register_backend() -> None:
    """joblib's "loky" backend (the one Hydra's joblib launcher asks for), its workers set up
    by `_init_worker` as they start."""
    from joblib import parallel
    from joblib._parallel_backends import LokyBackend

    class StoppableLoky(LokyBackend):
        def configure(self, *args: Any, **kwargs: Any) -> int:
            return super().configure(*args, initializer=_init_worker, **kwargs)

    parallel.register_parallel_backend("loky", StoppableLoky)


class StopSweepOnSignal(Callback):
    """Hydra callback (`hydra.callbacks` in train.yaml): the signal handling described above.

    Only acts for the joblib launcher: the basic launcher runs in one process, whose run stops
    and ends it; submitit runs each job as its own process (or SLURM job), signalled directly.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if _is_joblib(config):
            _register_backend()
            for signum in SIGNALS:
                signal.signal(signum, _on_launcher_signal)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if _requested is not None and _is_joblib(config):
            log.warning("sweep stopped by %s; run the same command to resume it",
                        signal.Signals(_requested).name)
            raise SystemExit(128 + _requested)
