"""The 13 BLURB datasets: a registry read from the task configs, and the BLURB score."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import pandas as pd  # loads with the published tables, not with the registry

TASK_TYPES = ("ner", "pico", "relation", "similarity", "doc_classification", "qa")

# Published score tables shipped under reference/ (see reference/README.md).
PUBLISHED_TABLES: dict[str, str] = {
    "gu2021": "gu2021_blurb_test.csv",
    "linkbert2022": "linkbert2022_blurb_test.csv",
    "indus2024": "indus2024_seed_variance.csv",
}


@cache
def tasks() -> dict[str, DictConfig]:
    """Every task config that declares a `blurb:` section, keyed by task name.

    The task yaml files under `conf/task/` are the single source of each dataset's facts
    (folder, type, labels, metric, Gu et al. Table 3 counts); this reads them, unresolved.
    """
    out: dict[str, DictConfig] = {}
    for path in sorted(files("blurbtune").joinpath("conf", "task").iterdir(), key=str):
        if not path.name.endswith(".yaml"):
            continue
        cfg = OmegaConf.create(path.read_text())
        if "blurb" in cfg:
            out[str(cfg.name)] = cfg
    return out


@cache
def _names() -> dict[str, str]:
    """Task name or `blurb.display` name -> task name."""
    out: dict[str, str] = {}
    for name, cfg in tasks().items():
        out[name] = name
        out[str(cfg.blurb.display)] = name
    return out


def task_name(key: str) -> str:
    """The task name for a task name or a display name: `"BC5-chem"` -> `"bc5chem"`."""
    try:
        return _names()[key]
    except KeyError:
        raise ValueError(f"unknown BLURB dataset {key!r}; valid: {sorted(_names())}") from None


def score(scores: Mapping[str, float]) -> float:
    """The BLURB score: the mean over the six task types of the mean over each type's datasets.

    Keys are task names (`bc5chem`) or display names (`BC5-chem`), one per dataset, all 13
    required. The score is on the scale of the inputs (0-1 or 0-100; do not mix them).

    >>> round(score(published_scores("gu2021")["pubmedbert"]), 2)
    81.16
    """
    by_task: dict[str, float] = {}
    for key, value in scores.items():
        name = task_name(key)
        if name in by_task:
            raise ValueError(f"{name!r} is given twice (as a task name and a display name)")
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"the score of {key!r} is NaN")
        by_task[name] = value
    missing = sorted(set(tasks()) - set(by_task))
    if missing:
        raise ValueError(f"the BLURB score needs all 13 datasets; missing: {missing}")
    by_type: dict[str, list[float]] = {task_type: [] for task_type in TASK_TYPES}
    for name, value in by_task.items():
        by_type[str(tasks()[name].type)].append(value)
    return sum(sum(v) / len(v) for v in by_type.values()) / len(by_type)


def _read_table(table: str) -> pd.DataFrame:
    if table not in PUBLISHED_TABLES:
        raise ValueError(f"unknown table {table!r}; valid: {sorted(PUBLISHED_TABLES)}")
    import pandas as pd

    path = files("blurbtune").joinpath("reference", PUBLISHED_TABLES[table])
    with path.open() as f:
        return pd.read_csv(f, comment="#", index_col=0)


def published_scores(table: str = "gu2021") -> pd.DataFrame:
    """Published test scores (0-100): one row per task name, one column per model.

    Tables: `gu2021` (Gu et al. 2021, Table 6), `linkbert2022` (Yasunaga et al. 2022,
    Table 7), `indus2024` (Bhattacharjee et al. 2024, Table 4: mean and std over 10 seeds).
    Rows are in the paper's order; the paper's own BLURB row is `published_blurb(table)`.
    """
    import pandas as pd

    raw = _read_table(table).drop(index="BLURB", errors="ignore")
    out = raw.set_axis(pd.Index([task_name(key) for key in raw.index], name="task"))
    missing = sorted(set(tasks()) - set(out.index))
    if missing or out.index.has_duplicates:
        raise ValueError(f"table {table!r} is incomplete or repeats a row; missing: {missing}")
    return out


def published_blurb(table: str = "gu2021") -> pd.Series:
    """The BLURB score row as printed in a published table (0-100), one value per model."""
    raw = _read_table(table)
    if "BLURB" not in raw.index:
        raise ValueError(f"table {table!r} prints no BLURB score")
    return raw.loc["BLURB"].rename("BLURB")
