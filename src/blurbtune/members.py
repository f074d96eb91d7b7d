"""Which runs a command makes, where each one's folder is, and the config record it keeps.

A plain command makes one run, in the folder Hydra gives it. A command with `stack=[0,1,2]`
makes one run per seed, trained together (see `blurbtune.stacking`): each member gets the
folder, config and overrides that the same command with `seed=<s>` instead of the `stack`
override would get, so a stacked run is found, reported, verified and resumed as a single run.
The folders sit beside the stack's own (Hydra's output folder for the stack command, which
holds only the stack's log and `stack.json`).

Hydra writes nothing into a folder itself (`hydra.output_subdir: null`): `write_record` puts
`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` in place once the run holds the
folder's lock and has decided to run, so a command that skips or refuses a folder leaves it
as it was.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from blurbtune import console
from blurbtune.errors import ConfigError
from blurbtune.io import write_text_atomic
from blurbtune.reproducibility import resolve_seeds
from blurbtune.settings import SEED_MAX

STACK_KEY = "stack"
SEED_KEYS = ("seed", "data_seed", "init_seed")
RECORD = ".hydra"
STACK_FILE = "stack.json"


@dataclass
class Planned:
    """One run a command makes: its config (seeds set, no `stack`), folder, seeds, the task
    overrides its folder is named from, and, for a stack member, the stack's record."""

    cfg: DictConfig
    out: Path
    seeds: dict[str, int]
    overrides: list[str]
    stack: dict | None = None


def members_of(value: Any) -> list[dict[str, int]]:
    """The members a `stack` value names: `[0, 1, 2]` (seeds) or mappings of seed keys, e.g.
    `[{seed: 0, data_seed: 5}, ...]`. Raises ConfigError on anything else."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"stack={value!r}: expected a non-empty list of seeds, e.g. "
                          "stack=[0,1,2,3]")
    members = []
    for item in value:
        member = item if isinstance(item, dict) else {"seed": item}
        unknown = set(member) - set(SEED_KEYS)
        if unknown or "seed" not in member:
            raise ConfigError(f"stack={value}: each member is a seed or a mapping of "
                              f"{', '.join(SEED_KEYS)} with a seed; got {item!r}")
        for key, seed in member.items():
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
                raise ConfigError(f"stack={value}: {key}={seed!r} is not a seed (expected an "
                                  "integer in [0, 2^64 - 1])")
        members.append(dict(member))
    if len({tuple(sorted(m.items())) for m in members}) < len(members):
        raise ConfigError(f"stack={value}: a member is named twice; each seed trains once")
    return members


def _member_override_lines(member: dict[str, int]) -> list[str]:
    return [f"{key}={member[key]}" for key in SEED_KEYS if key in member]


def member_overrides(overrides: list[str], member: dict[str, int]) -> list[str]:
    """The stack command's overrides with its `stack=` one replaced by the member's seeds:
    the overrides the unstacked command of that member has."""
    out: list[str] = []
    for line in overrides:
        key = line.split("=", 1)[0].lstrip("+~")
        if key == STACK_KEY:
            out.extend(_member_override_lines(member))
        elif key in member:
            raise ConfigError(f"{line}: the stack names each member's {key}; drop {line} or "
                              "the stack")
        else:
            out.append(line)
    return out


def override_dirname(overrides: list[str], hydra_cfg: Any) -> str:
    """`hydra.job.override_dirname` of a job with these overrides, as Hydra computes it."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    opts = hydra_cfg.job.config.override_dirname
    parsed = OverridesParser.create().parse_overrides(overrides)
    return get_overrides_dirname(parsed, exclude_keys=list(opts.exclude_keys),
                                 item_sep=opts.item_sep, kv_sep=opts.kv_sep)


def folder_name(overrides: list[str], hydra_cfg: Any) -> str:
    """The folder name a job with these overrides gets (conf/train.yaml: the `dirname` resolver
    of its override_dirname)."""
    from blurbtune.config import dirname

    return dirname(override_dirname(overrides, hydra_cfg))


def _hydra() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def task_overrides() -> list[str]:
    hydra_cfg = _hydra()
    return list(hydra_cfg.overrides.task) if hydra_cfg is not None else []


def output_dir(cfg: DictConfig) -> Path:
    """The folder Hydra gave this command (outside Hydra: `run_dir`, for tests and verify)."""
    hydra_cfg = _hydra()
    if hydra_cfg is not None:
        return Path(hydra_cfg.runtime.output_dir)
    return Path(cfg.get("run_dir") or "outputs/runs/adhoc")


def member_config(cfg: DictConfig, member: dict[str, int]) -> DictConfig:
    """`cfg` as the member's own run has it: its seeds set, no stack."""
    out = copy.deepcopy(cfg)
    with read_write(out), open_dict(out):
        for key in SEED_KEYS:
            if key in member:
                out[key] = member[key]
        out[STACK_KEY] = None
    return out


def plan(cfg: DictConfig) -> list[Planned]:
    """The runs this command makes: itself, or one per member of its `stack`."""
    overrides = task_overrides()
    if cfg.get(STACK_KEY) is None:
        seeds = resolve_seeds(cfg.seed, cfg.get("data_seed"), cfg.get("init_seed"))
        return [Planned(cfg, output_dir(cfg), seeds, overrides)]
    members = members_of(cfg[STACK_KEY])
    hydra_cfg = _hydra()
    stack_dir = output_dir(cfg)
    planned = []
    for position, member in enumerate(members):
        member_cfg = member_config(cfg, member)
        lines = member_overrides(overrides, member)
        if hydra_cfg is not None:
            out = stack_dir.parent / folder_name(lines, hydra_cfg)
        else:
            out = member_folder(stack_dir, member)
        seeds = resolve_seeds(member_cfg.seed, member_cfg.get("data_seed"),
                              member_cfg.get("init_seed"))
        record = {"size": len(members), "members": members, "position": position,
                  "folder": str(stack_dir)}
        planned.append(Planned(member_cfg, out, seeds, lines, record))
    if len({p.out for p in planned}) < len(planned):
        raise ConfigError(f"stack={cfg[STACK_KEY]}: two members would share a folder; their "
                          "seeds must appear in the folder name (hydra.job.config."
                          "override_dirname.exclude_keys must not list them)")
    return planned


@contextlib.contextmanager
def member_logs(planned: list[Planned]) -> Iterator[None]:
    """While a stack trains, every log record also goes to each member's `train.log` (a single
    run's log file, which Hydra opens for its own folder): a member's log is its process's."""
    if len(planned) < 2 or all(p.stack is None for p in planned):
        yield
        return
    root = logging.getLogger()
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    handlers = []
    for p in planned:
        p.out.mkdir(parents=True, exist_ok=True)
        handler = console.LogFile(p.out / "train.log")
        handler.setLevel(template.level if template else logging.INFO)
        handler.setFormatter(template.formatter if template else logging.Formatter(
            "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
        handlers.append(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def write_stack_file(planned: list[Planned]) -> None:
    """`stack.json` in the stack command's own folder: its members and their folders."""
    if not planned or planned[0].stack is None:
        return
    folder = Path(planned[0].stack["folder"])
    write_text_atomic(folder / STACK_FILE, json.dumps({
        "members": planned[0].stack["members"],
        "folders": [str(p.out) for p in planned]}, indent=2) + "\n")


def member_folder(stack_dir: Path, member: dict[str, int]) -> Path:
    """Where a member's run goes when the stack runs outside Hydra (tests, `blurbtune verify`):
    a folder per member in the stack's folder, named from its seeds (`seed=3`)."""
    return Path(stack_dir) / folder_name(_member_override_lines(member), _plain_hydra())


def _plain_hydra() -> Any:
    return OmegaConf.create({"job": {"config": {"override_dirname": {
        "exclude_keys": [], "item_sep": ",", "kv_sep": "="}}}})


def write_record(planned: Planned) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` (under Hydra) and `overrides.yaml` of a run, as Hydra
    writes them for a job, with the member's overrides and folder for a stack member."""
    folder = planned.out / RECORD
    task_cfg = planned.cfg
    if "hydra" in task_cfg:  # a config composed outside the command line carries Hydra's node
        task_cfg = copy.deepcopy(task_cfg)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(task_cfg))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(
        list(planned.overrides))))
    hydra_cfg = _hydra_record(planned)
    if hydra_cfg is not None:
        write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))


def _hydra_record(planned: Planned) -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    record = copy.deepcopy(HydraConfig.instance().cfg)
    if planned.stack is not None:
        with read_write(record.hydra), open_dict(record.hydra):
            record.hydra.overrides.task = list(planned.overrides)
            record.hydra.runtime.output_dir = str(planned.out.resolve())
            record.hydra.job.override_dirname = override_dirname(planned.overrides, record.hydra)
    return record
