"""The command line: blurbtune's --help, start-up without heavy imports, one way to set epochs,
python -m blurbtune, and a hub id without network."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from blurbtune import hub, models
from blurbtune.config import compose
from blurbtune.errors import ConfigError
from blurbtune.help import COMMON

CONF = ROOT / "src" / "blurbtune" / "conf"
HEAVY = ("torch", "transformers", "pytorch_lightning", "pandas", "matplotlib", "datasets",
         "scipy")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def help_text() -> str:
    done = run(str(ROOT / "train.py"), "--help")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_lists_every_group_and_option_in_conf(help_text: str) -> None:
    for group in ("model", "task", "stabilizer", "optimizer", "trainer", "logger", "experiment"):
        lines = help_text.splitlines()
        line = next(i for i, text in enumerate(lines) if text.startswith(f"  {group} "))
        end = next((i for i in range(line + 1, len(lines))
                    if not lines[i].startswith(" " * 14)), len(lines))
        block = " ".join(lines[line:end])  # the group's line and its continuation lines
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            assert re.search(rf"\b{option}\*?(\s|$)", block), (group, option)
    defaults = {k: v for e in OmegaConf.load(CONF / "train.yaml").defaults
                if hasattr(e, "items") for k, v in e.items()}
    assert f"{defaults['model']}*" in help_text and f"{defaults['stabilizer']}*" in help_text


def test_help_gives_each_stabilizer_knob_with_its_default_and_range(help_text: str) -> None:
    for path in (CONF / "stabilizer").glob("*.yaml"):
        for section, knobs in (OmegaConf.load(path) or {}).items():
            for knob, value in knobs.items():
                default = str(value).lower() if isinstance(value, bool) else str(value)
                line = next(t for t in help_text.splitlines()
                            if f"stabilizer.{section}.{knob}={default} " in t)
                assert len(line.split(maxsplit=1)) == 2  # and what values it takes
    assert "in (0, 1]" in help_text


def test_help_names_only_keys_that_exist() -> None:
    cfg = compose(["model=tiny"])
    for override, _ in COMMON:
        key = override.split("=")[0]
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or key in cfg, key


def test_help_examples_compose(help_text: str) -> None:
    examples = [t.strip() for t in help_text.split("Examples:")[1].splitlines()
                if t.strip().startswith("python train.py")]
    from blurbtune.help import EXAMPLES

    assert len(examples) == sum(cmd.startswith("python train.py") for _, cmd in EXAMPLES) == 4
    for line in examples:  # a sweep composes at its first point
        overrides = []
        for item in line.replace("'", "").split()[2:]:
            if item == "-m":
                continue
            key, value = item.split("=", 1)
            value = "0" if value.startswith("range(") else value.split(",")[0]
            overrides.append(f"{key}={value}")
        compose(overrides)


def test_read_only_commands_do_not_import_the_heavy_libraries() -> None:
    code = ("import sys; import blurbtune.cli, blurbtune.report.cli, blurbtune.data_check, "
            "blurbtune.train, blurbtune.help; blurbtune.help.text(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_python_dash_m_blurbtune_is_the_blurbtune_command() -> None:
    done = run("-m", "blurbtune", "--help")
    assert done.returncode == 0 and "report SWEEP" in done.stdout
    done = run("-m", "blurbtune", "report", "--help")
    assert done.returncode == 0 and "usage: blurbtune report" in done.stdout


def test_task_epochs_on_the_command_line_names_the_one_way(tmp_path: Path) -> None:
    done = run(str(ROOT / "train.py"), "model=tiny", "task.epochs=5", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: task.epochs=5: ")
    assert "trainer.max_epochs=N" in done.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


def test_unreachable_hub_is_reported_quickly() -> None:
    hub.unreachable.cache_clear()
    # Nothing listens on port 1 of this machine: the connection is refused at once.
    assert "cannot be reached" in hub.unreachable("http://127.0.0.1:1", timeout=2)
    hub.unreachable.cache_clear()


def test_a_hub_id_without_network_fails_with_the_way_out(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "unreachable", lambda: "huggingface.co cannot be reached (test)")
    monkeypatch.setattr(hub, "in_cache", lambda repo: False)
    with pytest.raises(ConfigError) as err:
        models._check_source("microsoft/some-model", "model.name_or_path")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg and "local folder" in msg


def test_with_hf_hub_offline_a_cached_hub_id_is_accepted(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    snapshot = tmp_path / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models._check_source("org/cached", "model.name_or_path")  # no error
    with pytest.raises(ConfigError, match="hub cache has no copy"):
        models._check_source("org/not-cached", "model.name_or_path")
