"""What a plain run prints: nothing outside the list docs/runs.md promises (issue 10)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, visible_lines

from blurbtune.models import package_path

SUMMARY = re.compile(r"^biosses / tiny / none / seed 0: "
                     r"dev pearson best -?\d\.\d{4} \(epoch \d+\), "
                     r"last -?\d\.\d{4}; test best -?\d\.\d{4}, last -?\d\.\d{4} "
                     r"\(constant predictor: -?\d\.\d{4}\)$")
# Every line a plain run may leave on the console.
ALLOWED = (
    re.compile(r"^Tokenising biosses/(train|dev|test):"),      # the tokenising bar of a split
    re.compile(r"^group +parameters +trainable +lr +weight_decay +frozen +reinit$"),  # the table
    re.compile(r"^-+$"),
    re.compile(r"^(embeddings|layer\.\d+|pooler|head) +[\d,]+ +[\d,]+ +\d\.\d{3}e-\d\d +[\d.]+"),
    re.compile(r"^total +[\d,]+ +[\d,]+ +\([\d.]+% of the parameters train\)$"),
    re.compile(r"^epoch [12]/2: "),                              # one bar per epoch, 1-based
    re.compile(r"^dev: "),                                       # the dev evaluation inside it
    re.compile(r"^test \(last epoch\): "),
    re.compile(r"^test \(best-on-dev weights\): "),
    SUMMARY,
    re.compile(r"^WARNING: degenerate run: "),                   # true for a tiny random model
    re.compile(r"^run folder: "),
)
GONE = ("LOAD REPORT", "litlogger", "weights_only", "exists and is not empty", "LeafSpec",
        "Total FLOPs", "GPU available", "Loading weights", "Saving the dataset", "DataLoader 0",
        "smaller than the logging interval")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved encoder (no task head): loading it under a head builds a new head."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("encoder")
    tok = AutoTokenizer.from_pretrained(package_path("data/tiny_tokenizer"))
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "task=biosses",
           f"data_dir={FIXTURES}", f"data.cache_dir={cwd / 'cache'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=600, env=env)
    # Decoded by hand: text=True would turn the bars' carriage returns into newlines.
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(),
                                       done.stderr.decode())


@pytest.mark.slow
def test_a_plain_run_prints_only_the_run(tmp_path: Path, checkpoint: Path) -> None:
    # An interval longer than an epoch (BIOSSES has 4 batches at the default batch size):
    # Lightning's advice about it is not about the run.
    done = train(tmp_path, f"model.name_or_path={checkpoint}", "trainer.log_every_n_steps=50")
    assert done.returncode == 0, done.stderr[-3000:]
    raw = done.stdout + done.stderr
    for noise in GONE:
        assert noise not in raw, noise
    lines = visible_lines(raw)
    strays = [line for line in lines if not any(p.search(line) for p in ALLOWED)]
    assert strays == []
    # ... and all of it is there, in order: table, epochs, tests, summary, folder.
    order = [r"^group ", r"^epoch 1/2: ", r"^epoch 2/2: ", r"^test \(last epoch\)",
             r"^test \(best-on-dev weights\)", SUMMARY.pattern, r"^run folder: "]
    where = [next(i for i, line in enumerate(lines) if re.search(p, line)) for p in order]
    assert where == sorted(where)
    epoch_end = [line for line in lines if line.startswith("epoch 2/2: 100%")][-1]
    assert "train/loss" in epoch_end and "dev/pearson=" in epoch_end  # metrics on the bar's line
    # The summary's best epoch is counted as the bars count (1/2, 2/2): results.json's
    # best_epoch is Lightning's, from 0.
    folder = Path(next(line for line in lines if line.startswith("run folder: "))[12:])
    recorded = json.loads((folder / "results.json").read_text())["best_epoch"]
    shown = int(re.search(r"\(epoch (\d+)\)", next(filter(SUMMARY.match, lines)))[1])
    assert recorded in (0, 1) and shown == recorded + 1

    again = train(tmp_path, f"model.name_or_path={checkpoint}", "trainer.log_every_n_steps=50")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = visible_lines(again.stdout + again.stderr)
    assert any("already completed, skipping" in line for line in rerun)
    assert [line for line in rerun if SUMMARY.match(line)] == \
        [line for line in lines if SUMMARY.match(line)]
    assert [line for line in rerun if line.startswith("run folder: ")] == \
        [line for line in lines if line.startswith("run folder: ")]


@pytest.mark.slow
def test_the_load_report_stays_when_an_encoder_key_is_missing(tmp_path: Path,
                                                                checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(checkpoint / "model.safetensors")
    dropped = next(k for k in weights if "encoder.layer.2." in k)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    done = train(tmp_path, f"model.name_or_path={broken}", "dry_run=true")
    assert done.returncode == 0, done.stderr[-3000:]
    raw = done.stdout + done.stderr
    assert "LOAD REPORT" in raw and dropped.split(".", 1)[-1] in raw


@pytest.mark.slow
def test_a_stack_prints_one_bar_an_epoch_and_each_members_summary(tmp_path: Path,
                                                                  checkpoint: Path) -> None:
    done = train(tmp_path, f"model.name_or_path={checkpoint}", "stack=[0,1,2]")
    assert done.returncode == 0, done.stderr[-3000:]
    raw = done.stdout + done.stderr
    for noise in GONE:
        assert noise not in raw, noise
    lines = visible_lines(raw)
    stack = [re.compile(r"^stack of 3: seeds 0, 1, 2, trained together; one folder each$"),
             re.compile(r"^stack of 3 \(seeds 0, 1, 2\): 3 completed; dev pearson best min "
                        r"-?\d\.\d{4}, median -?\d\.\d{4}, max -?\d\.\d{4}$"),
             re.compile(r"^biosses / tiny / none / seed [012]: dev pearson best ")]
    strays = [line for line in lines if not any(p.search(line) for p in (*ALLOWED, *stack))]
    assert strays == []
    bars = [line for line in lines if re.match(r"^epoch [12]/2: 100%", line)]
    assert len({line[:11] for line in bars}) == 2  # one bar per epoch, for the whole stack
    assert re.search(r"train/loss=[\d.]+, dev min=-?[\d.]+, dev med=-?[\d.]+, "
                     r"dev max=-?[\d.]+", bars[-1])  # the members' dev metric on its line
    summaries = [line for line in lines if line.startswith("biosses / tiny / none / seed ")]
    assert sorted(line.split(":")[0][-1] for line in summaries) == ["0", "1", "2"]


def test_the_stack_summary_gives_its_members_median() -> None:
    """Two members: the median is their mean (numpy's), not the larger one."""
    from types import SimpleNamespace

    import numpy as np

    from blurbtune.console import stack_summary

    scores = [0.3978, 0.2628]
    module = SimpleNamespace(members=[SimpleNamespace(best_score=s, diverged=None)
                                      for s in scores])
    line = stack_summary([0, 1], module, "pearson")
    assert line.endswith(f"min 0.2628, median {np.median(scores):.4f}, max 0.3978")
    assert "median 0.3303" in line


@pytest.mark.slow
def test_no_bar_is_drawn_after_a_failed_runs_error_line(tmp_path: Path) -> None:
    """The bars of a run that stops with an error are closed before its error line is printed,
    not redrawn below it when the process exits (one stream, as a terminal shows both)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "task=biosses",
           f"data_dir={FIXTURES}", f"data.cache_dir={tmp_path / 'cache'}", "optimizer.lr=1e30",
           "trainer.max_epochs=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600, env=env)
    raw = done.stdout.decode()
    assert done.returncode == 2, raw[-3000:]
    tail = raw[raw.rindex("error: "):]
    expected = r"error: training loss became nan at epoch 1/2, step \d+"
    assert re.fullmatch(expected, tail.rstrip("\n")), tail
