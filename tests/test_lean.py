"""What a stack does once rather than once a member, and what an epoch does beside its steps
(issue 24: a lean start and a lean epoch). The timings are in docs/benchmark.md, measured by
benchmarks/bench_start.py; these tests hold the counts that make them, never a wall time."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import needs_fixtures, tiny_config

from blurbtune import models
from blurbtune.run import run

pytestmark = needs_fixtures
ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# 16 training rows in batches of 4: 4 steps an epoch, 8 in all; Lightning writes steps 2, 5.
COMMON = ("trainer.max_epochs=2", "trainer.log_every_n_steps=3", "checkpoint_every=0")


def _stack(tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / "stack"
    run(tiny_config(out, tmp_path / "cache", *COMMON, *overrides,
                    f"stack=[{','.join(map(str, SEEDS))}]"))
    return out


def test_a_stack_fingerprints_its_tokenizer_once(tmp_path, monkeypatch) -> None:
    import blurbtune.datamodule as datamodule

    calls = []

    def counted(tokenizer):
        calls.append(1)
        return fingerprint(tokenizer)

    fingerprint = models.tokenizer_fingerprint
    monkeypatch.setattr(models, "tokenizer_fingerprint", counted)
    monkeypatch.setattr(datamodule, "tokenizer_fingerprint", counted)
    out = _stack(tmp_path)
    assert len(calls) == 1  # was 1 + one a member (~1 s each for MiniLM's 30k-word vocabulary)
    cfg = tiny_config(out, tmp_path / "cache")
    expected = fingerprint(models.load_tokenizer(cfg.model, cfg.task))
    for seed in SEEDS:
        record = json.loads((out / f"seed={seed}" / "provenance.json").read_text())
        assert record["tokenizer"]["fingerprint"] == expected


def test_a_stack_logs_its_members_losses_on_the_steps_lightning_writes(
        tmp_path, monkeypatch) -> None:
    from blurbtune.module import FineTuner

    names = []
    log = FineTuner.log

    def counted(self, name, *args, **kwargs):
        names.append(name)
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(FineTuner, "log", counted)
    _stack(tmp_path)
    member_losses = [n for n in names if n.startswith("m") and "/train/loss" in n]
    # 3 members x (2 written steps + 2 epoch ends); it was 3 members x 8 steps
    assert len(member_losses) == len(SEEDS) * (2 + 2)


def _loss_rows(folder: Path) -> list[tuple]:
    with open(folder / "metrics.csv") as f:
        return [(int(r["step"]), int(r["epoch"]), key, float(r[key]))
                for r in csv.DictReader(f)
                for key in ("train/loss_step", "train/loss_epoch") if r.get(key)]


def test_a_members_metrics_csv_has_its_single_runs_training_losses(tmp_path) -> None:
    stack = _stack(tmp_path)
    for seed in (0, 2):
        single = tmp_path / f"single-{seed}"
        run(tiny_config(single, tmp_path / "cache", *COMMON, f"seed={seed}"))
        expected, found = _loss_rows(single), _loss_rows(stack / f"seed={seed}")
        assert [r[:3] for r in found] == [r[:3] for r in expected]
        assert len(expected) == 2 + 2  # Lightning's rows: steps 2 and 5, two epoch means
        assert [r[3] for r in found] == pytest.approx([r[3] for r in expected], rel=1e-5)


def test_the_start_benchmark_runs_dry(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_start.py"), "--dry",
                           "--json", str(tmp_path / "start.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "first_step" in done.stdout and (tmp_path / "start.json").is_file()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_start.py"),
                           "--costs", "--model", "tiny", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokenizer fingerprint" in done.stdout


def test_the_package_list_reads_each_distributions_metadata_once(monkeypatch) -> None:
    import importlib.metadata as md

    from blurbtune import provenance

    # A folder on sys.path twice (an editable install's src/) lists its distribution twice:
    # one read per distribution listed, not per path.
    listed = sum(1 for _ in md.distributions())
    reads: list[str] = []
    read_text = md.PathDistribution.read_text

    def counted(self, filename):
        text = read_text(self, filename)
        if filename in ("METADATA", "PKG-INFO") and text is not None:  # egg-info: no METADATA
            reads.append(str(self._path))
        return text

    monkeypatch.setattr(md.PathDistribution, "read_text", counted)
    found = provenance.packages()
    assert len(reads) == listed  # it read each one twice (Name, then version)
    expected = {d.metadata["Name"]: d.version for d in md.distributions() if d.metadata["Name"]}
    assert found == dict(sorted(expected.items(), key=lambda kv: kv[0].lower()))
