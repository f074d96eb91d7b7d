"""What a checkpoint holds (issue 26): each run's own tensors once, as contiguous copies, never
a view of a stack's storage; no frozen tensor (they are the pretrained model's, named by their
hash); best weights written once when they change; and a file whose pickle would run code is
refused, with nothing run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from tiny_runs import needs_fixtures, tiny_config

from blurbtune.errors import BlurbtuneError
from blurbtune.module import FineTuner
from blurbtune.run import run

pytestmark = needs_fixtures

SEEDS = (0, 1, 2, 3)
# freeze_lower: the tiny model's embeddings and layers 0-2 are frozen, shared by the stack.
COMMON = ("trainer.max_epochs=2", "stabilizer=freeze_lower")
FROZEN_PREFIXES = ("model.bert.embeddings.", "model.bert.encoder.layer.0.",
                   "model.bert.encoder.layer.1.", "model.bert.encoder.layer.2.")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _stop_mid_epoch(monkeypatch):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FineTuner, "on_train_batch_end", on_train_batch_end)


def _interrupted(out: Path, cache: Path, monkeypatch, *overrides: str) -> None:
    with monkeypatch.context() as m:
        _stop_mid_epoch(m)
        with pytest.raises(SystemExit):
            run(tiny_config(out, cache, *COMMON, *overrides))


def _unique_storage_bytes(obj) -> tuple[int, int]:
    """(sum of untyped_storage().nbytes() over the unique storages, sum of tensor bytes)."""
    storages, tensor_bytes = {}, 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            tensor_bytes += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return sum(storages.values()), tensor_bytes


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def stopped_stack(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("stack")
    with pytest.MonkeyPatch.context() as m:
        _interrupted(out, cache, m, f"stack=[{','.join(map(str, SEEDS))}]")
    return out


def test_a_members_checkpoint_holds_its_own_tensors_once(stopped_stack):
    for seed in SEEDS:
        folder = stopped_stack / f"seed={seed}" / "checkpoints"
        files = sorted(folder.iterdir(), key=lambda f: f.name != "last.ckpt")
        for path in files:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            storage, tensors = _unique_storage_bytes(loaded)
            assert storage == tensors, path
        assert [f.name for f in files if f.name != "last.ckpt"] != []  # its best weights


def test_frozen_tensors_are_named_by_hash_not_written(stopped_stack):
    loaded = torch.load(stopped_stack / "seed=0" / "checkpoints" / "last.ckpt",
                        weights_only=True)
    assert not [k for k in loaded["state_dict"] if k.startswith(FROZEN_PREFIXES)]
    assert any(k.startswith("model.bert.encoder.layer.3.") for k in loaded["state_dict"])
    frozen = loaded["blurbtune_frozen"]
    assert len(frozen["sha256"]) == 64
    assert frozen["names"] and all(n.startswith(FROZEN_PREFIXES) for n in frozen["names"])


def test_a_stack_of_4_writes_no_more_than_4_single_runs(stopped_stack, tmp_path, cache):
    single_bytes = 0
    for seed in SEEDS:
        out = tmp_path / f"single{seed}"
        with pytest.MonkeyPatch.context() as m:
            _interrupted(out, cache, m, f"seed={seed}")
        single_bytes += _folder_bytes(out / "checkpoints")
    stack_bytes = sum(_folder_bytes(stopped_stack / f"seed={s}" / "checkpoints") for s in SEEDS)
    assert stack_bytes <= single_bytes


def test_best_weights_are_written_when_they_change(tmp_path, cache, monkeypatch):
    from blurbtune import checkpoints

    written = []
    real = checkpoints.write_atomic

    def recording(obj, path):
        written.append(Path(path).name)
        real(obj, path)

    monkeypatch.setattr(checkpoints, "write_atomic", recording)
    out = tmp_path / "run"
    run(tiny_config(out, cache, "trainer.max_epochs=4", "checkpoint_every=1", "task=hoc"))
    history = [h["dev"] for h in json.loads((out / "results.json").read_text())["history"]]
    improvements = sum(1 for i, d in enumerate(history) if d > max(history[:i], default=-1e9))
    assert written.count("last.ckpt") == 4
    assert len([n for n in written if n.startswith("best-")]) == improvements < 4


def test_resume_with_other_frozen_weights_is_one_line(tmp_path, cache, monkeypatch):
    """The frozen tensors are taken from the pretrained model on resume: if it is not the
    model the run started from, the resume stops, naming the checkpoint."""
    from blurbtune import checkpoints
    from blurbtune import run as run_code

    out = tmp_path / "run"
    _interrupted(out, cache, monkeypatch)

    real = run_code.load_model

    def other_weights(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight.add_(1e-3)
        return model

    monkeypatch.setattr(run_code, "load_model", other_weights)
    with pytest.raises(checkpoints.FrozenMismatch) as e:
        run(tiny_config(out, cache, *COMMON))
    assert str(out / "checkpoints" / "last.ckpt") in str(e.value) and "\n" not in str(e.value)


class _Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(tmp_path, cache):
    out = tmp_path / "run"
    marker = tmp_path / "ran"
    path = out / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 0, "global_step": 0, "blurbtune_resume": {"batches_done": 0},
                "x": _Payload(marker)}, path)
    before = path.read_bytes()
    try:
        run(tiny_config(out, cache))
    except Exception as e:  # noqa: BLE001 - which one is asserted below, after the marker
        error = e
    assert not marker.exists()  # nothing ran
    assert isinstance(error, BlurbtuneError), error
    message = str(error)
    assert message.startswith(f"{path}: refused") and "\n" not in message
    assert path.read_bytes() == before  # left where it is, for the user to look at


def test_auto_checkpoints_each_epoch_while_writing_costs_less_than_the_epoch():
    from blurbtune.resume import Schedule

    auto = Schedule("auto", 1800)
    assert auto.at_epoch_end(0, since_last=60, epoch_s=60, write_s=None)  # first: no write yet
    assert auto.at_epoch_end(3, since_last=60, epoch_s=60, write_s=20)
    assert not auto.at_epoch_end(3, since_last=60, epoch_s=60, write_s=90)  # costs more
    assert auto.at_epoch_end(3, since_last=1800, epoch_s=60, write_s=90)  # then every 30 min
    assert not auto.mid_epoch(1799) and auto.mid_epoch(1800)
    timed = Schedule("seconds", 120)
    assert not timed.at_epoch_end(0, since_last=119, epoch_s=1, write_s=0)
    assert timed.at_epoch_end(0, since_last=120, epoch_s=1, write_s=0) and timed.mid_epoch(120)
    epochs = Schedule("epochs", 2)
    assert [epochs.at_epoch_end(e, 0, 0, None) for e in range(4)] == [False, True, False, True]
    assert not epochs.mid_epoch(10**6) and not Schedule("epochs", 0).at_epoch_end(1, 9, 9, 0)
