"""How many CPU threads a run uses: `threads=N`, or by default the CPUs this process may use.

torch starts one intra-op thread per core it sees, whatever the container's CPU quota, the
scheduler's allocation or the other jobs on the machine; on a shared 2-core machine two such
processes fight over 4 threads and each runs several times slower. The default here is the
smallest of the CPU affinity mask, the cgroup CPU quota and SLURM_CPUS_PER_TASK, unless
OMP_NUM_THREADS is set (by the user, or by a launcher such as joblib for its workers).

OpenMP threads that wait for work spin by default (OMP_WAIT_POLICY=ACTIVE in practice), which
burns the cores another process needs; the entry point sets OMP_WAIT_POLICY=PASSIVE unless the
user set it, before torch starts OpenMP (see `set_wait_policy`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def quota_cpus(cpu_max: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` line (`"200000 100000"` -> 2.0; `"max ..."` -> None).

    >>> quota_cpus("150000 100000")
    1.5
    """
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpus_from(affinity: int | None, cpu_max: str | None, slurm_cpus: str | None) -> int:
    """The CPUs a process may use: the smallest of what each source allows, at least 1.

    A fractional quota rounds down (1.5 CPUs -> 1 thread), as a second thread would be
    throttled for part of every period.

    >>> cpus_from(8, "200000 100000", None)
    2
    >>> cpus_from(8, "max 100000", "3")
    3
    """
    limits = [affinity] if affinity else []
    quota = quota_cpus(cpu_max)
    if quota is not None:
        limits.append(max(1, math.floor(quota)))
    if slurm_cpus and slurm_cpus.strip().isdigit() and int(slurm_cpus) > 0:
        limits.append(int(slurm_cpus))
    return max(1, min(limits)) if limits else max(1, os.cpu_count() or 1)


def read_cpu_max(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> str | None:
    """This process's cgroup CPU quota as a v2 `cpu.max` line; None if there is none to read.

    cgroup v2: `<root>/<own path>/cpu.max`, else `<root>/cpu.max`. cgroup v1: the `cpu`
    controller's `cpu.cfs_quota_us` and `cpu.cfs_period_us` (quota -1: no limit).
    """
    v2, v1 = [], []
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            path = path.strip().lstrip("/")
            if hierarchy == "0" and not controllers:
                v2.append(root / path / "cpu.max")
            elif "cpu" in controllers.split(","):
                v1 += [root / controllers / path, root / "cpu" / path]
    except OSError:
        pass
    for path in [*v2, root / "cpu.max"]:
        try:
            return path.read_text().strip()
        except OSError:
            continue
    for folder in [*v1, root / "cpu"]:
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return f"{'max' if quota < 0 else quota} {period}"
    return None


def available_cpus(env: Mapping[str, str] = os.environ, root: Path = CGROUP_ROOT,
                   proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may use (affinity mask, cgroup quota, SLURM_CPUS_PER_TASK)."""
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        affinity = os.cpu_count()
    return cpus_from(affinity, read_cpu_max(root, proc_cgroup), env.get("SLURM_CPUS_PER_TASK"))


def resolve(setting: int | None, env: Mapping[str, str] = os.environ,
            root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, str]:
    """(threads, where the number came from) for the `threads` setting (None: the default)."""
    if setting is not None:
        if int(setting) < 1:
            from blurbtune.errors import ConfigError

            raise ConfigError(f"threads={setting}: expected a positive integer, or null for the "
                              "CPUs this process may use")
        return int(setting), "threads setting"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return available_cpus(env, root, proc_cgroup), "available CPUs"


def set_wait_policy(env: MutableMapping[str, str] = os.environ) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose; must run before torch loads OpenMP."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def apply(setting: int | None) -> dict:
    """Set torch's intra-op threads from the `threads` setting; return what was set."""
    import torch

    threads, source = resolve(setting)
    torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "source": source,
            "available_cpus": available_cpus(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
