"""Atomic writes: a crash or a kill never leaves a half-written results file; a write that
fails on a full disk raises OSError(ENOSPC) naming its file, whatever the writing library
raised (`writing`), so the run records it and the command says it in one line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

UMASK = os.umask(0o022)  # read once, at import (setting it is the only way to read it)
os.umask(UMASK)


FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, disk quota exceeded
NEARLY_FULL = 1 << 20  # free bytes under which a failed write is put down to a full disk


def disk_full(path: Path) -> bool:
    """Whether the file system that holds `path` (or its nearest existing folder) is full."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free < NEARLY_FULL
    except OSError:
        return False


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Around a write to `path`: an error raised while its file system is full becomes
    OSError(ENOSPC) naming `path`. Libraries say a full disk in their own ways (torch.save's
    zip writer: RuntimeError "unexpected pos"; safetensors: SafetensorError); the check is
    made as the error rises, before a partial file is removed."""
    try:
        yield
    except Exception as e:
        full = as_full_disk(e, path)
        if full is e:
            raise
        raise full from e


def as_full_disk(error: BaseException, path: Path) -> BaseException:
    """`error`, or the OSError(ENOSPC) naming `path` that it amounts to: a full-disk OSError
    that names no file, or any other error raised while the file system of `path` is full
    (the errors blurbtune raises for bad input or a divergence stay what they are)."""
    from blurbtune.errors import BlurbtuneError

    if isinstance(error, OSError) and error.errno in FULL:
        return error if error.filename else OSError(error.errno, error.strerror, str(path))
    if isinstance(error, Exception) and not isinstance(error, BlurbtuneError | OSError) \
            and disk_full(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return error


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
