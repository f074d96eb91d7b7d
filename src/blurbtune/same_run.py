"""Whether a run folder already holds this run, or a run of another configuration.

A run folder is named from the command's overrides, less some keys (`data_dir`, the cache
folder, the launcher...), so two commands can name one folder and differ in what they train.
Before a command skips, resumes or overwrites what a folder holds, `differences` compares the
folder's recorded config and data with the command's: keys that change a number (everything
but `report.identity.NO_EFFECT`), and the data by the sha256 of its files (data the command
cannot read differs from any recorded data: it cannot be shown to be the same). A difference
stops the command for that folder, naming the keys; the folder is left as it was.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from blurbtune.data import SPLITS, sha256_file, split_path
from blurbtune.errors import BlurbtuneError
from blurbtune.report.identity import (
    ADDED_KEYS,
    CONFIG_FILE,
    NO_EFFECT,
    PROVENANCE_FILE,
    resolved_config,
    resolved_mapping,
)

ABSENT = "(absent)"
BY_CONTENT = ("data_dir",)  # compared by the data's sha256, not the path


def _compared(key: str) -> bool:
    if key in BY_CONTENT or key == "hydra" or key.startswith("hydra."):
        return False
    return not any(fnmatchcase(key, p) or fnmatchcase(key, p + ".*") for p in NO_EFFECT)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def config_of(cfg: DictConfig) -> dict[str, Any]:
    """The dotted keys a run of `cfg` records (resolved as `.hydra/config.yaml` would be)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    return resolved_mapping(raw)


def data_hashes(task: Any, data_dir: str | Path) -> dict[str, str] | str:
    """sha256 of each split file the run would read, or why the data cannot be read."""
    try:
        return {split: sha256_file(split_path(task, data_dir, split)) for split in SPLITS}
    except BlurbtuneError as e:
        return str(e)
    except OSError as e:
        return f"{e.filename}: {e.strerror}"


def recorded_data(folder: Path) -> dict[str, str] | None:
    try:
        record = json.loads((Path(folder) / PROVENANCE_FILE).read_text(encoding="utf-8"))
        return {split: entry["sha256"] for split, entry in record["data"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def differences(folder: Path, cfg: DictConfig) -> list[str]:
    """`key: recorded -> this command` for each setting that differs between the run recorded
    in `folder` and the run `cfg` makes; empty when they are one run (or nothing is recorded).
    Raises ValueError when the recorded config cannot be read."""
    folder = Path(folder)
    lines = []
    if (folder / CONFIG_FILE).is_file():
        old = {**ADDED_KEYS, **resolved_config(folder / CONFIG_FILE)}
        new = {**ADDED_KEYS, **config_of(cfg)}
        for key in sorted(set(old) | set(new)):
            if _compared(key) and _text(old.get(key, ABSENT)) != _text(new.get(key, ABSENT)):
                lines.append(f"{key}: {old.get(key, ABSENT)} -> {new.get(key, ABSENT)}")
    old_data = recorded_data(folder)
    if old_data:
        new_data = data_hashes(cfg.task, cfg.data_dir)
        if isinstance(new_data, str):  # a recorded run is never taken for one on unread data
            return [*lines, f"data: the recorded splits' sha256 -> this command's data cannot be "
                    f"read ({new_data})"]
        for split in SPLITS:
            if split in new_data and old_data.get(split) != new_data[split]:
                lines.append(f"data {split} (sha256): {str(old_data.get(split))[:8]} -> "
                             f"{new_data[split][:8]}")
    return lines
