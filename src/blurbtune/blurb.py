"""The 13 BLURB datasets: a registry read from the task configs, and the BLURB score."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from omegaconf import DictConfig, OmegaConf

TASK_TYPES = ("ner", "pico", "relation", "similarity", "doc_classification", "qa")


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
