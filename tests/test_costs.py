"""What keeps a run cheap in memory and time: gradients freed after each optimizer step,
checkpoints written straight to their file, frozen weights not copied into the best-on-dev
state, gradient norms logged only on the steps Lightning writes, length-grouped training
batches by default where lengths vary, and evaluation batches sorted by length."""

from __future__ import annotations

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
from test_stabilizers import make
from tiny_runs import needs_fixtures, tiny_config

from blurbtune.errors import ConfigError
from blurbtune.module import best_weights
from blurbtune.stabilizers import freeze_lower_layers


def test_best_weights_copy_trainable_tensors_and_share_frozen_ones() -> None:
    model = make("bert")
    frozen = set(freeze_lower_layers(model, 2))
    state = best_weights(model)
    live = model.state_dict()
    assert state.keys() == live.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, live[name]) and not tensor.requires_grad
        assert (tensor.data_ptr() == live[name].data_ptr()) == (name in frozen), name
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what training does to trainable weights; frozen ones never move
    trainable = next(n for n, p in model.named_parameters() if p.requires_grad)
    assert not torch.equal(state[trainable], model.state_dict()[trainable])


def test_group_by_length_auto_is_on_where_random_batches_are_mostly_padding() -> None:
    from blurbtune.datamodule import padding_fraction, resolve_group_by_length

    # Hand-worked: batches [3, 9] and [5, 5] pad to 9 and 5: 22 real tokens of 28 fed.
    assert padding_fraction([3, 9, 5, 5], [0, 1, 2, 3], 2) == pytest.approx(1 - 22 / 28)
    varied = [3, 300] * 64  # a short and a long row in (nearly) every random batch
    even = [77, 80] * 64  # BIOSSES-like pairs
    assert resolve_group_by_length("auto", varied, 16, seed=0) is True
    assert resolve_group_by_length("auto", even, 16, seed=0) is False
    assert resolve_group_by_length(False, varied, 16, seed=0) is False
    assert resolve_group_by_length(True, even, 16, seed=0) is True
    with pytest.raises(ConfigError, match="data.group_by_length='sometimes'"):
        resolve_group_by_length("sometimes", even, 16, seed=0)
    # 128 rows of batch 16 pool 2 batches; 48 rows would pool 1 (the same batches each epoch
    # if sorted whole), so auto leaves them in random batches.
    assert resolve_group_by_length("auto", varied[:48], 16, seed=0) is False


def test_pools_hold_4_batches_and_an_epoch_at_least_4_pools() -> None:
    from blurbtune.datamodule import pool_batches

    assert [pool_batches(n, 32) for n in (100, 128, 255, 256, 384, 512, 1024, 5424)] == [
        1, 1, 1, 2, 3, 4, 4, 4]


PROBES: list = []


class _Probe(pl.Callback):
    """Records whether any gradient survives past the step that used it."""

    def __init__(self) -> None:
        self.grads_after_step: list[bool] = []
        PROBES.append(self)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.grads_after_step.append(any(p.grad is not None for p in module.parameters()))


@needs_fixtures
def test_gradients_are_freed_after_each_step_and_checkpoints_skip_the_memory_buffer(
        tmp_path, monkeypatch) -> None:
    import lightning_fabric.utilities.cloud_io as cloud_io

    from blurbtune.run import run

    def buffered(*a, **k):  # Lightning's writer, which holds the checkpoint in memory twice
        raise AssertionError("checkpoint went through Lightning's in-memory writer")

    monkeypatch.setattr(cloud_io, "_atomic_save", buffered)
    monkeypatch.setattr("lightning_fabric.plugins.io.torch_io._atomic_save", buffered)
    out = tmp_path / "run"
    run(tiny_config(out, tmp_path / "cache", "task=ncbi_disease",
                            "keep_checkpoints=true",
                            "+trainer.callbacks=[{_target_: test_costs._Probe}]"))
    probe = PROBES[-1]
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    assert probe.grads_after_step and not any(probe.grads_after_step)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert (out / "checkpoints" / ckpt["blurbtune"]["best_file"]).is_file()
    assert not list((out / "checkpoints").glob(".*tmp"))


@needs_fixtures
def test_gradient_norms_are_written_every_log_every_n_steps(tmp_path) -> None:
    from blurbtune.run import run

    out = tmp_path / "run"
    run(tiny_config(out, tmp_path / "cache", "trainer.max_epochs=2",
                    "trainer.log_every_n_steps=3"))
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad_norm/total")]
    # 16 examples / batch 4 = 4 steps an epoch, 8 in all: Lightning writes steps 2 and 5
    # (0-based, every third), and each such row has every part's norm.
    assert [int(r["step"]) for r in rows] == [2, 5]
    for r in rows:
        parts = [float(v) for k, v in r.items()
                 if k.startswith("grad_norm/") and k != "grad_norm/total"]
        assert float(r["grad_norm/total"]) == pytest.approx(sum(v * v for v in parts) ** 0.5,
                                                             rel=1e-5)


@needs_fixtures
def test_evaluation_batches_run_longest_first_and_predictions_stay_in_input_order(
        tmp_path) -> None:
    from blurbtune.datamodule import BlurbDataModule
    from blurbtune.models import load_tokenizer

    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", "task=ncbi_disease")
    tok = load_tokenizer(cfg.model, cfg.task)
    dm = BlurbDataModule(cfg.task, tok, cfg.data_dir, batch_size=4, eval_batch_size=3,
                         cache_dir=cfg.data.cache_dir)
    dm.prepare()
    loader = dm.val_dataloader()
    order = [i for batch in loader for i in batch["example_idx"].tolist()]
    lengths = [len(ids) for ids in dm.encoded["dev"]["input_ids"]]
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)


def test_file_hashes_are_computed_once_per_file_version(tmp_path) -> None:
    import hashlib
    import os

    from blurbtune.data import _sha256, sha256_file

    path = tmp_path / "train.tsv"
    path.write_bytes(b"a\tb\n")
    assert sha256_file(path) == hashlib.sha256(b"a\tb\n").hexdigest()
    hits = _sha256.cache_info().hits
    assert sha256_file(path) == hashlib.sha256(b"a\tb\n").hexdigest()
    assert _sha256.cache_info().hits == hits + 1  # the second run of a sweep reads nothing
    path.write_bytes(b"a\tc\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(path) == hashlib.sha256(b"a\tc\n").hexdigest()


def test_compiled_model_computes_what_the_eager_one_does_and_keeps_its_keys() -> None:
    from blurbtune.models import compile_model

    eager = make("bert")
    compiled = make("bert")
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        for length in (7, 11):  # a second length runs the same dynamic-shape graph
            ids = torch.randint(5, 50, (3, length), generator=torch.Generator().manual_seed(length))
            assert torch.allclose(compiled(input_ids=ids).logits, eager(input_ids=ids).logits,
                                  atol=1e-5)


@needs_fixtures
def test_a_compiled_run_completes_and_records_what_auto_chose(tmp_path) -> None:
    from blurbtune.run import run

    out = tmp_path / "run"
    run(tiny_config(out, tmp_path / "cache", "task=ncbi_disease", "trainer.compile=true"))
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert isinstance(results["group_by_length"], bool)


def test_bf16_clipping_works_with_the_fused_optimizer() -> None:
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; bf16 has no
    gradient scaler, so FineTuner clips the true gradients itself, to the global norm."""
    from omegaconf import OmegaConf

    from blurbtune.module import FineTuner

    model = make("bert")
    params = [p for p in model.parameters()]
    module = FineTuner(model, OmegaConf.create({"type": "relation", "metric": "micro_f1"}),
                       [{"params": params, "lr": 1e-3, "weight_decay": 0.0}],
                       lambda groups: torch.optim.AdamW(groups, fused=True), 0.1, lambda s: [])
    module.trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False,
                                enable_progress_bar=False)
    optimizer = torch.optim.AdamW(params, fused=True)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    before = [p.grad.clone() for p in params]
    total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in before)))
    assert total > 1.0
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0,
                                       gradient_clip_algorithm="norm")
    for p, g in zip(params, before, strict=True):
        assert torch.allclose(p.grad, g / total, rtol=1e-4, atol=1e-7)


@needs_fixtures
def test_a_bf16_run_completes(tmp_path) -> None:
    from blurbtune.run import run

    out = tmp_path / "run"
    run(tiny_config(out, tmp_path / "cache", "trainer.precision=bf16-mixed"))
    assert json.loads((out / "results.json").read_text())["status"] == "completed"


def test_fp16_with_a_scaler_steps_unfused_so_that_clipping_sees_unscaled_gradients() -> None:
    import functools
    import types

    from omegaconf import OmegaConf

    from blurbtune.module import FineTuner

    model = make("bert")
    factory = functools.partial(torch.optim.AdamW, fused=True)
    module = FineTuner(model, OmegaConf.create({"type": "relation", "metric": "micro_f1"}),
                       [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.0}],
                       factory, 0.1, lambda s: [])
    for scaler, fused in ((object(), False), (None, True)):
        module._trainer = types.SimpleNamespace(
            precision_plugin=types.SimpleNamespace(scaler=scaler), estimated_stepping_batches=10)
        optimizer = module.configure_optimizers()["optimizer"]
        assert optimizer.defaults["fused"] is fused


class _TestPasses(pl.Callback):
    def __init__(self) -> None:
        self.passes = 0
        PROBES.append(self)

    def on_test_start(self, trainer, module) -> None:
        self.passes += 1


@needs_fixtures
def test_test_is_scored_once_when_the_best_weights_are_the_last(tmp_path) -> None:
    """One epoch: the best-on-dev weights are the final ones, so one test pass scores both."""
    from blurbtune.run import run

    out = tmp_path / "run"
    run(tiny_config(out, tmp_path / "cache",
                    "+trainer.callbacks=[{_target_: test_costs._TestPasses}]"))
    results = json.loads((out / "results.json").read_text())
    assert PROBES[-1].passes == 1
    assert results["test"]["best"] == results["test"]["last"]
    best, last = ((out / "predictions" / name).read_text().splitlines()
                  for name in ("test.jsonl", "test_last.jsonl"))
    assert best == last
