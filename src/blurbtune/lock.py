"""One process at a time per run folder: an OS file lock held for the whole life of a run.

The lock is `flock` on `<run folder>/run.lock` (through `filelock.lock_descriptor`, which is
`LockFileEx` on Windows). The operating system releases it when its process ends, however it
ends, so a lock left by a killed or lost process is simply taken by the next one. The file holds
the holder's host, pid and start time, for the message of a process that finds it taken.

>>> with RunLock(folder):          # doctest: +SKIP
...     train()                    # another process's RunLock(folder) raises LockHeld meanwhile
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import lock_descriptor, unlock_descriptor

log = logging.getLogger("blurbtune")

NAME = "run.lock"


class LockHeld(Exception):  # noqa: N818 (a state, not a mistake of the caller)
    """Another live process holds the run folder's lock; the message names it."""


def describe(holder: dict[str, Any] | None) -> str:
    """`pid 123 on host-1 since 2026-01-02 03:04:05`, from the lock file's record."""
    if not holder:
        return "a process that has not written its name yet"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"since {holder.get('since', '?')}")


class RunLock:
    """Exclusive lock on a run folder. `acquire` does not wait: it raises `LockHeld`."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not lock_descriptor(fd, blocking=False):
                raise LockHeld(f"{self.path.parent} is being run by {describe(_read(fd))} "
                               f"(lock: {self.path})")
            previous = _read(fd)
            if previous:  # a holder that ended without releasing: killed, or its node lost
                log.info("taking over the lock of %s, which is no longer running: %s",
                         describe(previous), self.path)
            try:
                _write(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv})
            except OSError as e:  # a full disk: the lock holds; only the holder's name is lost
                log.warning("could not write the holder's name into %s (%s)", self.path, e)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):  # an empty file: released in order
                os.ftruncate(fd, 0)
            unlock_descriptor(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return {"pid": "?", "host": "?", "since": "?"}


def _write(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
