"""Reading a task's splits from disk: file lookup, validation, hashing, BLURB-unit counts."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blurbtune.errors import DataError
from blurbtune.tasks import task_type

SPLITS = ("train", "dev", "test")


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes; a sweep's runs in one process hash each file once (the key
    is the file's path, size and modification time, so a changed file is hashed again)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_path(task: Any, data_dir: str | Path, split: str) -> Path:
    """The file of `split`; a list in the yaml names accepted alternatives (dev.tsv, devel.tsv)."""
    root = Path(data_dir).expanduser() / str(task.folder)
    names = task.files[split]
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if (root / name).is_file():
            return root / name
    for name in names:
        if (root / name).exists():
            raise DataError(root / name, f"is not a file; expected the {split} split of task "
                                         f"{task.name!r} as a file")
    if not root.is_dir():
        raise DataError(root, f"no folder for task {task.name!r} (data_dir={data_dir}); expected "
                              f"BLURB's data_generation layout <data_dir>/{task.folder}/")
    raise DataError(root / names[0], f"missing {split} split of task {task.name!r}; expected one "
                                     f"of {names} in {root}")


@dataclass
class Split:
    name: str
    path: Path
    sha256: str
    examples: list[dict] = field(repr=False)


def read_split(task: Any, data_dir: str | Path, split: str) -> Split:
    """Read and validate one split; an empty split is an error."""
    path = split_path(task, data_dir, split)
    examples = task_type(task.type).read(path, task)
    if not examples:
        raise DataError(path, f"the {split} split of task {task.name!r} has no examples")
    return Split(split, path, sha256_file(path), examples)


def read_splits(task: Any, data_dir: str | Path) -> dict[str, Split]:
    return {split: read_split(task, data_dir, split) for split in SPLITS}
