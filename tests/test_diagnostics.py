"""Gradient diagnostics: per-part norms against torch's own clipping norm and hand sums; the
per-epoch history and the results.json summary of a real (tiny) run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_stabilizers import make, random_batch
from tiny_runs import needs_fixtures, tiny_config

from blurbtune.diagnostics import GradientStats, grad_norms, part_params
from blurbtune.stabilizers import freeze_lower_layers


def _backward(model: torch.nn.Module, head: str = "seq") -> None:
    torch.manual_seed(0)
    model.zero_grad()
    model(**random_batch(head)).loss.backward()


@pytest.mark.parametrize("family", ["bert", "electra", "roberta"])
def test_grad_norms_match_torch_clipping_and_hand_norms(family: str) -> None:
    model = make(family)
    _backward(model)
    parts = part_params(model)
    norms = grad_norms(parts)
    names = dict(model.named_parameters())
    for i, (part, params) in enumerate(parts.items()):
        flat = torch.cat([p.grad.flatten() for p in params])
        assert norms[i].item() == pytest.approx(flat.norm().item(), rel=1e-5), part
        in_part = [n for n, p in names.items() if any(p is q for q in params)]
        if part.startswith("layer."):
            assert all(f".{part.split('.')[1]}." in n for n in in_part)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=math.inf)
    assert norms[-1].item() == pytest.approx(total.item(), rel=1e-5)


def test_frozen_parts_are_left_out() -> None:
    model = make("bert")
    freeze_lower_layers(model, 2)
    parts = list(part_params(model))
    assert "embeddings" not in parts and "layer.0" not in parts and "layer.1" not in parts
    assert parts[0] == "layer.2" and parts[-1] == "head"


def test_gradient_stats_means_and_clip_fraction_by_hand() -> None:
    rng = np.random.default_rng(1)
    steps = rng.uniform(0.1, 3.0, size=(9, 3))  # 9 steps, parts a and b, then the total
    stats = GradientStats(["a", "b"], early_steps=4, clip_threshold=1.0)
    for row in steps:
        stats.update(torch.tensor(row))
    out = stats.summary()
    assert out["steps"] == 9 and out["early_steps"] == 4
    for i, name in enumerate(["a", "b", "total"]):
        assert out["grad_norm"]["early"][name] == pytest.approx(steps[:4, i].mean())
        assert out["grad_norm"]["whole"][name] == pytest.approx(steps[:, i].mean())
    assert out["clip_fraction"] == pytest.approx((steps[:, 2] > 1.0).mean())


def test_gradient_stats_resume_from_state() -> None:
    rows = [torch.tensor([float(i), 2.0 * i, 3.0]) for i in range(1, 7)]
    whole = GradientStats(["a", "b"], early_steps=2, clip_threshold=2.5)
    first = GradientStats(["a", "b"], early_steps=2, clip_threshold=2.5)
    for row in rows:
        whole.update(row)
    for row in rows[:3]:
        first.update(row)
    second = GradientStats(["a", "b"], early_steps=2, clip_threshold=2.5)
    second.load_state_dict(first.state_dict())
    for row in rows[3:]:
        second.update(row)
    assert second.summary() == whole.summary()


def test_gradient_stats_resumed_from_host_tensors_sum_on_the_training_device() -> None:
    """A checkpoint's records are read into host memory; a GPU run's norms then come from the
    GPU (on an H200 every resumed run failed at its first step: "found at least two devices,
    cuda:0 and cpu"). The meta device stands in for the GPU on a machine without one."""
    first = GradientStats(["a", "b"], early_steps=2, clip_threshold=2.5)
    first.update(torch.tensor([1.0, 2.0, 3.0]))
    second = GradientStats(["a", "b"], early_steps=2, clip_threshold=2.5)
    second.load_state_dict(first.state_dict())
    second.update(torch.tensor([1.0, 2.0, 3.0], device="meta"))
    assert all(total.device.type == "meta" for total in second.sums.values())
    assert second.steps == 2


@needs_fixtures
def test_run_records_history_and_gradient_summary(tmp_path) -> None:
    from blurbtune.run import run

    out = tmp_path / "run"
    run(tiny_config(out, tmp_path / "cache", "trainer.max_epochs=2", "optimizer.lr=1e-3",
                    "trainer.log_every_n_steps=2"))
    results = json.loads((out / "results.json").read_text())
    history = results["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    steps_per_epoch = math.ceil(16 / 4)
    # Linear warm-up over round(0.1 * 8) = 1 step, then linear decay to 0 over the other 7;
    # LLRD is off, so the top layer has the base lr.
    assert history[0]["lr_top"] == pytest.approx(1e-3 * (8 - steps_per_epoch) / 7)
    assert history[1]["lr_top"] == pytest.approx(0.0, abs=1e-12)
    assert all(h["train_loss"] > 0 for h in history)
    diag = results["diagnostics"]
    assert diag["steps"] == 8 and diag["early_steps"] == 1
    parts = list(diag["grad_norm"]["whole"])
    assert parts == ["embeddings", "layer.0", "layer.1", "layer.2", "layer.3", "pooler", "head",
                     "total"]
    assert 0.0 <= diag["clip_fraction"] <= 1.0 and diag["clip_threshold"] == 1.0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"grad_norm/layer.0", "grad_norm/head", "grad_norm/total"} <= set(header)
