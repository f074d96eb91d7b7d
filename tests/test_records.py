"""What a run folder records is never rewritten or lost by a later command (issue 20).

A folder is named from some of the command's overrides only, so another command can land in a
finished or stopped run's folder. Whatever it does there, the folder keeps what it holds: a
run of another configuration is refused naming what differs; a damaged checkpoint is set
aside with its record; a full disk leaves no half-written file; a dry run writes nothing into
a finished run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
from tiny_runs import copy_task_folder, needs_fixtures, tiny_config

from blurbtune.errors import ConfigError
from blurbtune.run import run

pytestmark = needs_fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.lock", "train.log")}


@pytest.fixture
def completed(tmp_path, cache):
    out = tmp_path / "run"
    run(tiny_config(out, cache, "trainer.max_epochs=2"))
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    return out


def _other_data(root: Path) -> Path:
    """A copy of the BIOSSES fixture whose training split lost its last pair."""
    data = copy_task_folder("BIOSSES", root)
    train = data / "BIOSSES" / "train.tsv"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:-1]))
    return data


def test_a_completed_run_with_other_data_is_refused_and_left_as_it_was(
        completed, tmp_path, cache):
    before = _snapshot(completed)
    other = tiny_config(completed, cache, "trainer.max_epochs=2",
                        data_dir=_other_data(tmp_path / "other"))
    with pytest.raises(ConfigError, match=r"holds a run of another configuration \(data train "
                                          r"\(sha256\): [0-9a-f]{8} -> [0-9a-f]{8}\)"):
        run(other)
    assert _snapshot(completed) == before


def test_a_completed_run_is_refused_when_this_commands_data_cannot_be_read(
        completed, tmp_path, cache):
    """Data that is missing cannot be shown to be the recorded data: refused, not skipped."""
    before = _snapshot(completed)
    missing = tiny_config(completed, cache, "trainer.max_epochs=2", data_dir=tmp_path / "none")
    with pytest.raises(ConfigError, match=r"holds a run of another configuration \(data: the "
                       r"recorded splits' sha256 -> this command's data cannot be read \(.*"
                       r"no folder for task 'biosses'"):
        run(missing)
    assert _snapshot(completed) == before


def test_a_members_refused_folder_is_said_once(tmp_path, cache, caplog):
    """A stack command whose member folder holds another configuration: its other member
    trains, and the refusal is the command's error, not also a logged ERROR line."""
    stack = tmp_path / "stack"
    run(tiny_config(stack / "seed=0", cache, "trainer.max_epochs=2", "seed=0"))
    with caplog.at_level(logging.INFO, logger="blurbtune"), \
            pytest.raises(ConfigError, match="seed=0 holds a run of another configuration"):
        run(tiny_config(stack, cache, "trainer.max_epochs=1", "stack=[0,1]"))
    assert not [r for r in caplog.records if "another configuration" in r.getMessage()]
    assert json.loads((stack / "seed=1" / "results.json").read_text())["status"] == "completed"


def test_settings_outside_the_folder_name_are_compared(completed, cache):
    before = _snapshot(completed)
    with pytest.raises(ConfigError) as info:
        run(tiny_config(completed, cache, "trainer.max_epochs=2", "optimizer.weight_decay=0.5",
                        "task.max_length=64"))
    message = str(info.value)
    assert "optimizer.weight_decay: 0.01 -> 0.5" in message
    assert "task.max_length: 128 -> 64" in message
    assert "\n" not in message
    assert _snapshot(completed) == before


def test_a_dry_run_aimed_at_a_finished_run_writes_nothing_there(completed, cache, capsys):
    before = _snapshot(completed)
    with pytest.raises(ConfigError, match="stabilizer.llrd.decay"):
        run(tiny_config(completed, cache, "trainer.max_epochs=2", "stabilizer=llrd",
                        "dry_run=true"))
    run(tiny_config(completed, cache, "trainer.max_epochs=2", "dry_run=true"))
    assert "no folder (each holds a finished run, left as it is)" in capsys.readouterr().out
    assert _snapshot(completed) == before


def test_the_same_command_skips_a_completed_run_without_touching_it(completed, cache, caplog):
    before = _snapshot(completed)
    with caplog.at_level(logging.INFO, logger="blurbtune"):
        run(tiny_config(completed, cache, "trainer.max_epochs=2", "threads=1"))
    assert any("already completed, skipping" in r.getMessage() for r in caplog.records)
    assert _snapshot(completed) == before


def _interrupted(tmp_path: Path, cache: Path, monkeypatch) -> Path:
    from blurbtune.module import FineTuner

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            os.kill(os.getpid(), 15)

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(FineTuner, "on_train_batch_end", on_train_batch_end)
        with pytest.raises(SystemExit):
            run(tiny_config(out, cache, "trainer.max_epochs=3"))
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"
    return out


def test_an_interrupted_run_does_not_resume_on_other_data(tmp_path, cache, monkeypatch):
    out = _interrupted(tmp_path, cache, monkeypatch)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"data train \(sha256\)"):
        run(tiny_config(out, cache, "trainer.max_epochs=3",
                        data_dir=_other_data(tmp_path / "other")))
    assert _snapshot(out) == before
    run(tiny_config(out, cache, "trainer.max_epochs=3"))  # its own data: it resumes
    assert json.loads((out / "results.json").read_text())["resumed_from"]


def test_a_truncated_checkpoint_is_set_aside_with_its_record_and_the_run_starts_again(
        tmp_path, cache, monkeypatch, caplog):
    out = _interrupted(tmp_path, cache, monkeypatch)
    checkpoint = out / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])
    record = (out / "results.json").read_bytes()
    with caplog.at_level(logging.WARNING, logger="blurbtune"):
        run(tiny_config(out, cache, "trainer.max_epochs=3"))
    [warning] = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert str(checkpoint) in warning and "set aside" in warning
    [kept] = (out / "set-aside").iterdir()
    assert (kept / "checkpoints" / "last.ckpt").stat().st_size == 4096
    assert (kept / "results.json").read_bytes() == record
    done = json.loads((out / "results.json").read_text())
    assert done["status"] == "completed" and done["resumed_from"] is None
    assert len(done["history"]) == 3


def test_a_truncated_results_file_is_refused_not_retrained(completed, cache):
    results = completed / "results.json"
    results.write_text(results.read_text()[:100])
    before = _snapshot(completed)
    with pytest.raises(ConfigError, match=r"results.json: unreadable \("):
        run(tiny_config(completed, cache, "trainer.max_epochs=2"))
    assert _snapshot(completed) == before


def test_a_full_disk_leaves_no_half_written_checkpoint(tmp_path, cache, monkeypatch):
    import torch

    from blurbtune import checkpoints

    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"x" * 1000)  # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    out = tmp_path / "full"
    with monkeypatch.context() as m:
        m.setattr(checkpoints.torch, "save", full)
        with pytest.raises(OSError, match="No space left"):
            run(tiny_config(out, cache, "trainer.max_epochs=2"))
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / "results.json").read_text())["status"] == "failed"
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    run(tiny_config(out, cache, "trainer.max_epochs=2"))  # space freed: the same command
    assert json.loads((out / "results.json").read_text())["status"] == "completed"


def test_a_full_disk_while_taking_the_lock_still_skips_a_completed_run(
        completed, cache, monkeypatch, caplog):
    from blurbtune import lock

    def full(fd, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock, "_write", full)
    before = _snapshot(completed)
    with caplog.at_level(logging.INFO, logger="blurbtune"):
        run(tiny_config(completed, cache, "trainer.max_epochs=2"))
    assert any("already completed, skipping" in r.getMessage() for r in caplog.records)
    assert _snapshot(completed) == before


def test_saving_the_model_on_a_full_disk_leaves_no_partial_model_folder(
        tmp_path, cache, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "saving"
    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
        with pytest.raises(OSError):
            run(tiny_config(out, cache, "save_model=true"))
    assert not (out / "model").exists() and not list(out.glob(".model*"))


def test_the_command_line_says_a_full_disk_in_one_line(tmp_path):
    """`python train.py` turns ENOSPC into one line naming the file and what to do."""
    from blurbtune import train

    lines = []

    def fail(message):
        lines.append(str(message))
        raise SystemExit(2)

    error = OSError(errno.ENOSPC, "No space left on device", "/x/results.json")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "_fail", fail)
        m.setattr("blurbtune.run.run", lambda cfg: (_ for _ in ()).throw(error))
        m.setattr(train, "check_overrides", lambda overrides: None)
        m.setattr(train, "_task_overrides", lambda: [])
        with pytest.raises(SystemExit):
            train._main.__wrapped__(tiny_config(tmp_path, tmp_path))
    assert lines == ["/x/results.json: No space left on device (errno 28); what the run had done "
                     "is recorded where it could be: free some space and run the same command "
                     "again (it resumes from its last checkpoint)"]

