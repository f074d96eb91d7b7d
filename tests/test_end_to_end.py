"""`experiment=smoke` end to end for every BLURB task on the fixtures, and a 2-seed multirun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, smoke_overrides

from blurbtune.blurb import tasks
from blurbtune.config import compose
from blurbtune.data import read_split
from blurbtune.metrics import METRICS
from blurbtune.run import run


def run_in_process(overrides: list[str], run_dir: Path) -> dict:
    cfg = compose([*overrides, f"+run_dir={run_dir}"])
    run(cfg)
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("name", sorted(tasks()))
def test_smoke_run_writes_results_and_predictions(name: str, tmp_path: Path,
                                                  cache_dir: Path) -> None:
    task = tasks()[name]
    results = run_in_process(smoke_overrides(name, cache_dir), tmp_path)
    assert results["status"] == "completed", results.get("error")
    assert results["task"] == name and results["metric"] == task.metric
    for split in ("dev", "test"):
        for which in ("best", "last"):
            assert isinstance(results[split][which], float)
    assert results["n_examples"]["test"] == len(read_split(task, FIXTURES, "test").examples)
    # The test score in results.json is the metric recomputed from the written predictions.
    rows = [json.loads(line) for line in (tmp_path / "predictions" / "test.jsonl").open()]
    assert len(rows) == results["n_examples"]["test"]
    gold, pred = [r["gold"] for r in rows], [r["pred"] for r in rows]
    labels = list(task.labels) if task.labels is not None else None
    if task.metric == "relation_f1":
        rescored = METRICS["relation_f1"](gold, pred, negative=str(task.negative_label))
    elif task.metric == "multilabel_f1":
        onehot = lambda names: [[int(lab in n) for lab in labels] for n in names]  # noqa: E731
        rescored = METRICS["multilabel_f1"](onehot(gold), onehot(pred))
    else:
        rescored = METRICS[task.metric](gold, pred)
    assert rescored == pytest.approx(results["test"]["best"], abs=1e-9)
    if task.type in ("ner", "pico"):
        assert all(len(r["gold"]) == len(r["pred"]) for r in rows)  # no word lost
    assert (tmp_path / "param_groups.json").is_file()


def test_long_sentence_is_windowed_not_truncated(tmp_path: Path, cache_dir: Path) -> None:
    """BC2GM's fixture has a 316-word sentence; max_length 64 must split it, not drop words."""
    results = run_in_process(smoke_overrides("bc2gm", cache_dir), tmp_path)
    assert results["lost_words"] == {"dev": 0, "test": 0}
    longest = max(len(ex["words"]) for ex in read_split(tasks()["bc2gm"], FIXTURES,
                                                        "train").examples)
    assert longest > 200


def test_dry_run_writes_the_table_and_trains_nothing(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose([*smoke_overrides("biosses", cache_dir), "stabilizer=[freeze_lower,llrd]",
                   "stabilizer.freeze.layers=2", "dry_run=true", f"+run_dir={tmp_path}"])
    run(cfg)
    table = json.loads((tmp_path / "param_groups.json").read_text())
    assert not (tmp_path / "results.json").exists()
    groups = {g["group"]: g for g in table["groups"]}
    assert groups["layer.0"]["frozen"] and groups["embeddings"]["frozen"]
    assert not groups["layer.2"]["frozen"]
    lr = cfg.optimizer.lr
    assert groups["layer.3"]["lr"] == pytest.approx(lr * 0.9)
    assert groups["layer.2"]["lr"] == pytest.approx(lr * 0.9**2)


def test_cli_multirun_two_seeds(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *smoke_overrides("biosses", cache_dir),
           "seed=0,1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.glob("*/results.json"))
    assert [p.parent.name for p in runs] == [
        "experiment=smoke,seed=0,task=biosses", "experiment=smoke,seed=1,task=biosses"] or \
        len(runs) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in runs)
    assert seeds == [0, 1]
    assert all(json.loads(p.read_text())["status"] == "completed" for p in runs)


def test_a_ddp_rank_other_than_0_prints_nothing_of_the_run(tmp_path: Path, cache_dir: Path,
                                                             capsys, monkeypatch) -> None:
    """Under DDP every rank runs `run`; only rank 0 prints the table and the summary (what
    decides: `rank_zero_only.rank`, set here as Lightning sets it in a process it started)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    overrides = [*smoke_overrides("biosses", cache_dir), "+trainer.enable_progress_bar=false"]
    run_in_process(overrides, tmp_path / "rank0")
    assert "run folder:" in capsys.readouterr().out
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    run_in_process(overrides, tmp_path / "rank1")
    out = capsys.readouterr().out
    assert "run folder:" not in out and "group" not in out, out


@pytest.mark.slow
def test_a_two_process_ddp_run_prints_one_summary(tmp_path: Path, cache_dir: Path) -> None:
    """A real 2-process DDP run on the CPU (gloo): one summary, one parameter table."""
    cmd = [sys.executable, str(ROOT / "train.py"), *smoke_overrides("biosses", cache_dir),
           f"hydra.run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "trainer.devices=2",
           "+trainer.strategy=ddp", "+trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1, proc.stdout
    assert proc.stdout.count("total ") == 1, proc.stdout  # the parameter table's last row
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"
