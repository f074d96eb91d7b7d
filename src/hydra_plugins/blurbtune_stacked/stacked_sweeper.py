"""`hydra/sweeper=stacked`: the jobs of a sweep that differ only in `seed` become stacks.

    python train.py -m task=biosses stabilizer=none,llrd seed='range(10)' hydra/sweeper=stacked

makes the sweep's jobs as the basic sweeper would (every combination), then puts together the
jobs that differ only in their seed, up to `hydra.sweeper.size` at a time: each stack is one
job, `... stabilizer=llrd stack=[0,1,2,3]`, that trains its seeds in one process
(`blurbtune.stacking`) and writes each seed's run folder as the unstacked job would. The
launcher decides where the jobs run (basic, `hydra/launcher=parallel`, `slurm_gpu`), as for
any sweep. A group of one seed stays a plain job.

`size`: an integer, or `auto`: on a CUDA device, as many members as the free memory holds,
shared by the jobs the launcher runs at once (`hydra.launcher.n_jobs` with
`hydra/launcher=parallel`; a measured probe step, `blurbtune.probe`); without one, 1 (on a
CPU a stack trains no faster than its runs one after another: docs/benchmark.md).

This module is imported whenever Hydra starts (it scans its plugins): it imports nothing heavy.
Its config dataclass keeps `typing` annotations (no `from __future__ import annotations`):
Hydra runs the module before registering it, and OmegaConf reads the annotations as types.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional  # noqa: UP035 - OmegaConf reads these as types

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override

log = logging.getLogger("blurbtune")

SEED = "seed"
STACK = "stack"


@dataclass
class StackedSweeperConf:
    _target_: str = "hydra_plugins.blurbtune_stacked.stacked_sweeper.StackedSweeper"
    size: Any = "auto"  # members per stack: an integer >= 1, or auto
    max_batch_size: Optional[int] = None  # noqa: UP045 - jobs given to the launcher at a time
    params: Optional[dict[str, str]] = None  # noqa: UP045


ConfigStore.instance().store(group="hydra/sweeper", name="stacked", node=StackedSweeperConf,
                             provider="blurbtune")


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def stack_jobs(jobs: list[list[str]], size: Callable[[list[str]], int]) -> list[list[str]]:
    """The sweep's jobs (override lists) with those that differ only in their `seed=` put
    together, `size(job)` at a time, as `stack=[s1,s2,...]` in the seed's place; the rest of
    a job's overrides, and the order jobs first appear in, kept. A group of one stays a plain
    job with its seed.

    >>> stack_jobs([["a=1", "seed=0"], ["a=1", "seed=1"], ["a=2", "seed=0"]], lambda j: 4)
    [['a=1', 'stack=[0,1]'], ['a=2', 'seed=0']]
    """
    groups: OrderedDict[tuple, list[tuple[list[str], str]]] = OrderedDict()
    for job in jobs:
        if any(_key(line) == STACK for line in job):
            raise ValueError(f"{' '.join(job)}: hydra/sweeper=stacked forms the stacks itself; "
                             "drop stack=")
        seeds = [line for line in job if _key(line) == SEED]
        if len(seeds) != 1:
            groups[("alone", len(groups))] = [(job, "")]
            continue
        shape = tuple(f"{SEED}=*" if _key(line) == SEED else line for line in job)
        groups.setdefault(shape, []).append((job, seeds[0].split("=", 1)[1]))
    out = []
    for shape, members in groups.items():
        if shape[0] == "alone" and isinstance(shape[1], int):
            out.append(members[0][0])
            continue
        n = max(1, int(size(members[0][0])))
        for start in range(0, len(members), n):
            chunk = members[start:start + n]
            if len(chunk) == 1:
                out.append(chunk[0][0])
                continue
            seeds = ",".join(seed for _, seed in chunk)
            out.append([f"{STACK}=[{seeds}]" if line == f"{SEED}=*" else line
                        for line in shape])
    return out


class StackedSweeper(BasicSweeper):
    """The basic sweeper, with the jobs that differ only in their seed stacked (see above)."""

    def __init__(self, size: Any = "auto", max_batch_size: int | None = None,
                 params: dict[str, str] | None = None) -> None:
        from blurbtune.settings import check_sweeper_size

        super().__init__(max_batch_size=max_batch_size, params=params)
        check_sweeper_size(size)  # the command line checked it already (blurbtune.sweep_outcome)
        self.size = size
        self._auto: Any = None  # blurbtune.probe.AutoSize, made at the first job that asks

    def split_arguments(self, overrides: list[Override],  # type: ignore[override]
                        max_batch_size: int | None) -> list[list[list[str]]]:
        jobs = BasicSweeper.split_arguments(overrides, None)[0]
        stacked = stack_jobs(jobs, self._members)
        n = len(stacked) if max_batch_size is None else max_batch_size
        batches = [stacked[i:i + n] for i in range(0, len(stacked), n)]
        log.info("stacked sweeper: %d runs in %d jobs (%s)", len(jobs), len(stacked),
                 f"size {self.size}")
        return batches

    def _members(self, job: list[str]) -> int:
        if str(self.size) != "auto":
            return int(self.size)
        if self._auto is None:  # one per sweep: the free memory read once, shared by its jobs
            from blurbtune.probe import AutoSize, jobs_at_once

            self._auto = AutoSize(jobs_at_once(self.config.hydra.launcher))
        return self._auto(lambda: self.hydra_context.config_loader.load_sweep_config(
            self.config, list(job)))
