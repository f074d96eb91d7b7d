"""Stopping a sweep: SIGTERM or Ctrl-C to the command stops every run after it checkpoints.

With `hydra/launcher=parallel` the runs train in joblib (loky) worker processes. Left alone, a
signal to the launching process kills it and nothing else: its workers train on, orphaned. Here
the launching process forwards the signal to its workers and waits for them; each worker's
running run stops after its batch, checkpoints and records `interrupted` (Lightning's SIGTERM
handling, see `resume.Resumable`), and the runs not yet started are not started. The command
then exits with 128 + the signal's number; the same command again resumes. A second signal to
the launching process aborts at once (joblib kills the workers; epoch-end checkpoints remain).

Why the workers do not simply exit: loky kills every other worker when one dies, so a worker
that stopped must stay alive, idle, until the pool shuts down with the launching process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("blurbtune")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None  # the signal that asked this process to stop
_pool_worker = False  # this process is a joblib worker of a sweep


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _requested


def request(signum: int) -> None:
    """Ask this process to stop: the running run stops at its next batch, no new run starts."""
    global _requested
    if _requested is None:
        _requested = int(signum)


class Stopped(KeyboardInterrupt):
    """A run of a process asked to stop, stopped before it trained."""


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
    if _requested is not None:
        log.warning("second %s: aborting the sweep now", signal.Signals(signum).name)
        raise KeyboardInterrupt
    request(signum)
    workers = multiprocessing.active_children()
    if not workers:  # no run under way (the pool is not up yet, or the sweep is over)
        raise SystemExit(128 + signum)
    log.warning("%s: stopping the sweep; %d worker(s) stop their runs after the current batch "
                "and checkpoint, runs not started are skipped (send it again to abort at once)",
                signal.Signals(signum).name, len(workers))
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(worker.pid, signal.SIGTERM)


def _on_worker_signal(signum: int, frame: Any) -> None:
    # Lightning's own SIGTERM handler runs beside this one while a run trains (it chains to it)
    # and stops training after the batch; outside training, the run stops at its next check.
    request(signum)


class StopSweepOnSignal(Callback):
    """Hydra callback (`hydra.callbacks` in train.yaml): the signal handling described above.

    Only acts for the joblib launcher: the basic launcher runs in one process, whose run stops
    and ends it; submitit runs each job as its own process (or SLURM job), signalled directly.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if _is_joblib(config):
            for signum in SIGNALS:
                signal.signal(signum, _on_launcher_signal)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        global _pool_worker
        if _is_joblib(config) and not _pool_worker:  # joblib runs jobs in its workers only
            _pool_worker = True
            for signum in SIGNALS:
                signal.signal(signum, _on_worker_signal)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if _requested is not None and _is_joblib(config):
            log.warning("sweep stopped by %s; run the same command to resume it",
                        signal.Signals(_requested).name)
            raise SystemExit(128 + _requested)
