"""The threads setting: the CPUs a process may use, from fabricated cgroup files and env."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import needs_fixtures, tiny_config

from blurbtune import threads
from blurbtune.errors import ConfigError
from blurbtune.run import run


@pytest.mark.parametrize("line, cpus", [
    ("max 100000", None), ("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5),
    ("", None), (None, None), ("garbage", None),
])
def test_quota_of_a_cpu_max_line(line, cpus) -> None:
    assert threads.quota_cpus(line) == cpus


@pytest.mark.parametrize("affinity, cpu_max, slurm, expected", [
    (8, None, None, 8),                 # nothing but the mask
    (8, "200000 100000", None, 2),      # a container's quota of 2 CPUs
    (8, "150000 100000", None, 1),      # 1.5 CPUs: a second thread would be throttled
    (8, "50000 100000", None, 1),       # never fewer than one
    (8, "max 100000", "3", 3),          # SLURM_CPUS_PER_TASK
    (2, "400000 100000", "16", 2),      # the smallest limit wins
    (4, None, "0", 4), (4, None, "x", 4),  # unusable SLURM values are ignored
])
def test_cpus_from_the_limits(affinity, cpu_max, slurm, expected) -> None:
    assert threads.cpus_from(affinity, cpu_max, slurm) == expected


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc_file = tmp_path / "proc_self_cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_cgroup_v2_quota_of_the_process_own_group(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "0::/job/step\n", {
        "cpu.max": "max 100000\n", "job/step/cpu.max": "300000 100000\n"})
    assert threads.read_cpu_max(root, proc) == "300000 100000"


def test_cgroup_v2_root_when_the_own_group_has_no_file(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "0::/elsewhere\n", {"cpu.max": "100000 100000\n"})
    assert threads.read_cpu_max(root, proc) == "100000 100000"


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "4:memory:/x\n1:cpu,cpuacct:/job\n0::/\n", {
        "cpu,cpuacct/job/cpu.cfs_quota_us": "250000\n",
        "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"})
    assert threads.read_cpu_max(root, proc) == "250000 100000"
    root, proc = _cgroup(tmp_path / "unlimited", "1:cpu:/\n", {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert threads.read_cpu_max(root, proc) == "max 100000"


def test_no_cgroup_files(tmp_path: Path) -> None:
    assert threads.read_cpu_max(tmp_path / "none", tmp_path / "none.txt") is None


def test_resolve_order(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    assert threads.resolve(3, {"OMP_NUM_THREADS": "1"}, root, proc) == (3, "threads setting")
    assert threads.resolve(None, {"OMP_NUM_THREADS": "2"}, root, proc) == (2, "OMP_NUM_THREADS")
    assert threads.resolve(None, {}, root, proc) == (1, "available CPUs")  # the 1-CPU quota
    with pytest.raises(ConfigError, match="threads=0"):
        threads.resolve(0, {})


def test_wait_policy_is_set_only_when_the_user_did_not() -> None:
    env: dict[str, str] = {}
    threads.set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


@needs_fixtures
def test_a_run_sets_and_records_its_threads(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        run(tiny_config(tmp_path / "run", tmp_path / "cache", "threads=2"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert results["threads"]["threads"] == 2 and results["threads"]["source"] == "threads setting"
    assert prov["threads"] == results["threads"]
    assert prov["determinism"]["torch_threads"] == 2
