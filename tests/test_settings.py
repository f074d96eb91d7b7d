"""Numeric and yes/no settings are checked once the config is composed: a value out of type or
range is one line naming the key, the value and what is allowed, before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import FIXTURES

from blurbtune.config import compose, config_dir
from blurbtune.errors import ConfigError
from blurbtune.settings import SETTINGS, check_settings

REPO = Path(__file__).resolve().parents[1]


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        check_settings(compose(["model=tiny", *overrides]))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("override, message", [
    # the cases: tracebacks, or a run recorded `completed` that trained nothing
    ("seed=-1", "seed=-1: expected an integer in [0, 2^64 - 1]"),
    ("seed=abc", "seed='abc': expected an integer in [0, 2^64 - 1]"),
    ("task.batch_size=0", "task.batch_size=0: expected an integer ≥ 1"),
    ("task.batch_size=-1", "task.batch_size=-1: expected an integer ≥ 1"),
    ("task.lr=abc", "task.lr='abc': expected a number > 0"),
    ("task.lr=0", "task.lr=0: expected a number > 0"),
    ("task.lr=-1", "task.lr=-1: expected a number > 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: expected an integer ≥ 1"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: no limit on epochs needs a limit on "
                              "steps (trainer.max_steps=N ≥ 1); else expected an integer ≥ 1"),
    # more of the same kind
    ("task.lr=nan", "task.lr=nan: expected a number > 0"),
    ("optimizer.lr=inf", "optimizer.lr=inf: expected a number > 0"),
    ("data_seed=1.5", "data_seed=1.5: expected an integer in [0, 2^64 - 1], or null (the seed)"),
    ("task.batch_size=2.5", "task.batch_size=2.5: expected an integer ≥ 1"),
    ("task.batch_size=true", "task.batch_size=true: expected an integer ≥ 1"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0: expected an integer ≥ 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0: expected -1 or an integer ≥ 1"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1: expected a number ≥ 0"),
    ("optimizer.warmup_ratio=2", "optimizer.warmup_ratio=2: expected a number in [0, 1]"),
    ("optimizer.gradient_clip_val=0", "optimizer.gradient_clip_val=0: expected a number > 0, or "
                                      "null (no clipping)"),
    ("task.max_length=abc", "task.max_length='abc': expected an integer ≥ 8"),
    ("task.max_length=4", "task.max_length=4: expected an integer ≥ 8"),
    ("data.max_train_examples=0", "data.max_train_examples=0: expected an integer ≥ 1, or null "
                                  "(all)"),
    ("data.num_workers=-1", "data.num_workers=-1: expected an integer ≥ 0"),
    ("threads=abc", "threads='abc': expected an integer ≥ 1, or null (the CPUs this process "
                    "may use)"),
    ("deterministic=maybe", "deterministic='maybe': expected true or false"),
    ("save_model=1", "save_model=1: expected true or false"),
    ("+trainer.limit_train_batches=0", "trainer.limit_train_batches=0: expected a number of "
                                       "batches ≥ 1, or a fraction in (0, 1], or null (every "
                                       "batch)"),
    # found by trying more (the issue asked to go past its list): each was a recorded failed
    # run or Hydra's multi-line error
    ("trainer.precision=fp13", "trainer.precision='fp13': expected one of 32-true, 16-mixed, "
                               "bf16-mixed, 16-true, bf16-true, 64-true, 32, 16, bf16, 64, "
                               "transformer-engine, transformer-engine-float16"),
    ("+trainer.matmul_precision=low", "trainer.matmul_precision='low': expected one of "
                                      "highest, high, medium, or null (torch's default)"),
    ("+trainer.limit_test_batches=1.5", "trainer.limit_test_batches=1.5: expected a number of "
                                        "batches ≥ 1, or a fraction in (0, 1], or null (every "
                                        "batch)"),
    # checkpoint_every: epochs, a time, or auto (issue 26)
    ("checkpoint_every=-1", "checkpoint_every=-1: expected a number of epochs ≥ 0 (0: only "
                            "when stopped), a time such as 30min, 2h or 90s, or auto"),
    ("checkpoint_every='30 minutes'", "checkpoint_every='30 minutes': expected a number of "
                                      "epochs ≥ 0 (0: only when stopped), a time such as 30min, "
                                      "2h or 90s, or auto"),
    ("checkpoint_every=0min", "checkpoint_every='0min': expected a number of epochs ≥ 0 (0: "
                              "only when stopped), a time such as 30min, 2h or 90s, or auto"),
])
def test_a_bad_value_is_one_line_with_the_range(override: str, message: str) -> None:
    assert error_of(override) == message


@pytest.mark.parametrize("overrides, key", [
    (("stabilizer=freeze_lower", "stabilizer.freeze.layers=abc"), "stabilizer.freeze.layers='abc'"),
    (("stabilizer=freeze_lower", "stabilizer.freeze.embeddings=maybe"),
     "stabilizer.freeze.embeddings='maybe'"),
    (("stabilizer=llrd", "stabilizer.llrd.decay=abc"), "stabilizer.llrd.decay='abc'"),
    (("stabilizer=reinit_top", "stabilizer.reinit.pooler=2"), "stabilizer.reinit.pooler=2"),
    (("stabilizer=lora", "stabilizer.lora.r=0"), "stabilizer.lora.r=0"),
    (("stabilizer=lora", "stabilizer.lora.r=2.5"), "stabilizer.lora.r=2.5"),
    (("stabilizer=lora", "stabilizer.lora.alpha=0"), "stabilizer.lora.alpha=0"),
    (("stabilizer=lora", "stabilizer.lora.dropout=1"), "stabilizer.lora.dropout=1"),
    (("stabilizer=lora", "stabilizer.lora.dropout=-0.1"), "stabilizer.lora.dropout=-0.1"),
])
def test_stabilizer_knobs_of_the_wrong_type(overrides: tuple[str, ...], key: str) -> None:
    assert error_of(*overrides).startswith(f"{key}: expected ")


def test_the_key_the_user_set_is_named_not_the_one_that_copies_it() -> None:
    """optimizer.lr is ${task.lr}, data.eval_batch_size is 4 x task.batch_size."""
    assert error_of("task.lr=-1").startswith("task.lr=")
    assert error_of("task.batch_size=abc").startswith("task.batch_size=")


@pytest.mark.parametrize("overrides", [
    (), ("seed=0",), ("data_seed=3", "init_seed=null"), ("task.lr=1", "trainer.max_epochs=1"),
    ("trainer.max_epochs=-1", "trainer.max_steps=10"), ("optimizer.gradient_clip_val=null",),
    ("optimizer.warmup_ratio=0", "optimizer.weight_decay=0"), ("threads=1",),
    ("+trainer.limit_train_batches=0.5",), ("+trainer.limit_train_batches=null",),
    ("task.lr=1e-5",), ("experiment=smoke",),
    ("experiment=quickstart",), ("experiment=study_biosses",), ("stabilizer=[llrd,reinit_top]",),
    ("stabilizer=lora", "stabilizer.lora.dropout=0"), ("trainer=gpu",),
    ("trainer.precision=bf16-mixed",), ("trainer.precision=32",),
])
def test_good_values_pass(overrides: tuple[str, ...]) -> None:
    check_settings(compose(["model=tiny", *overrides]))


def test_a_key_an_older_run_lacks_is_not_an_error() -> None:
    """`blurbtune verify` re-runs the config recorded by an older version."""
    from omegaconf import open_dict

    cfg = compose(["model=tiny"])
    with open_dict(cfg):
        del cfg["test_every_epoch"]
        del cfg.trainer["log_every_n_steps"]
    check_settings(cfg)


def test_every_task_and_experiment_passes_as_shipped() -> None:
    conf = Path(config_dir())
    for group in ("task", "experiment"):
        for path in sorted((conf / group).glob("*.yaml")):
            check_settings(compose([f"{group}={path.stem}"]))


def test_every_setting_is_a_key_of_the_config() -> None:
    """A renamed key must not leave its check behind, silently skipped."""
    cfg = compose(["model=tiny", "stabilizer=[freeze_lower,reinit_top,llrd,lora]",
                   "+trainer.matmul_precision=high",
                   "+stabilizer.recommended.low_resource=1000", "+trainer.limit_train_batches=1",
                   "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"])
    from omegaconf import OmegaConf

    missing = [s.key for s in SETTINGS if OmegaConf.select(cfg, s.key, default="-") == "-"]
    assert missing == []


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLURB_DATA_DIR": str(FIXTURES), "OMP_NUM_THREADS": "1",
           "BLURBTUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args, "model=tiny"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)


def test_train_py_says_it_in_one_line_and_exits_2(tmp_path: Path) -> None:
    done = _train(tmp_path, "task.lr=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: task.lr=0: expected a number > 0"
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_bad_value_in_a_sweep_skips_that_run_and_the_sweep_goes_on(tmp_path: Path) -> None:
    done = _train(tmp_path, "-m", "task.batch_size=0,4", "dry_run=true",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.returncode == 1, done.stderr[-2000:]  # after the other run: see sweep_outcome
    assert ("error: task.batch_size=0: expected an integer ≥ 1 (run not started; the sweep "
            "goes on)") in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: 1 run of this sweep failed, the others ran")
    good = tmp_path / "sweep" / "model=tiny,task.batch_size=4" / "param_groups.json"
    assert json.loads(good.read_text())["batch_size"] == 4
    bad = tmp_path / "sweep" / "model=tiny,task.batch_size=0"
    assert not (bad / "results.json").exists() and not (bad / "param_groups.json").exists()


def test_the_docs_list_every_setting() -> None:
    page = (REPO / "docs" / "reproducibility.md").read_text()
    assert [s.key for s in SETTINGS if f"`{s.key}`" not in page] == []


@pytest.mark.parametrize("value, parsed", [
    (0, ("epochs", 0)), (3, ("epochs", 3)), ("auto", ("auto", 1800)), ("30min", ("seconds", 1800)),
    ("2h", ("seconds", 7200)), ("90s", ("seconds", 90)), ("1.5h", ("seconds", 5400))])
def test_checkpoint_every_takes_epochs_a_time_or_auto(value, parsed) -> None:
    from blurbtune.settings import checkpoint_interval

    check_settings(compose(["model=tiny", f"checkpoint_every={value}"]))
    assert checkpoint_interval(value) == parsed
