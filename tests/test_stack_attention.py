"""Fused attention in a stack (blurbtune.stack_attention) against eager attention under vmap.

On the CPU in fp32: with dropout off, the fused path's loss, logits and gradients equal the
eager path's to 1e-6; with attention dropout on, a member's loss and gradients are the same
in any stack it trains in (its masks come from its own generator) and equal its single run's;
every family and head stacks each member as its own model through the fused path (the check of
tests/test_stacking.py, the attention forced fused); the fused path is taken
(scaled_dot_product_attention called, once for the stack or once per member) and no
[K, B, H, L, L] tensor is made. A stack's default (`auto`) is fused on a GPU and eager on a
CPU, where the exactness tests of tests/test_stacking.py run as before.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForSequenceClassification, BertConfig

from blurbtune import stacking

ROWS, LAYERS, HEADS, PADDED = 2, 2, 2, 9  # PADDED equals no other axis size


def _config(attention_p: float, hidden_p: float = 0.0) -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, intermediate_size=64,
                      max_position_embeddings=64, attention_probs_dropout_prob=attention_p,
                      hidden_dropout_prob=hidden_p, num_labels=3)


def _model(seed: int, config: BertConfig) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).train()


def _batch(seed: int, length: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 100, (ROWS, length), generator=gen),
            "labels": torch.randint(0, 3, (ROWS,), generator=gen)}


def _stack_step(seeds, data, lengths, config, attention):
    """One training forward and backward of a stack; returns (skeleton, stacked, output)."""
    skeleton, stacked = stacking.stack_models([_model(s, config) for s in seeds])
    assert stacking.prepare_skeleton(skeleton, attention) == attention
    inputs = {"input_ids": torch.zeros(len(seeds), ROWS, PADDED, dtype=torch.long),
              "attention_mask": torch.zeros(len(seeds), ROWS, PADDED, dtype=torch.long),
              "labels": torch.stack([d["labels"] for d in data])}
    for k, (d, n) in enumerate(zip(data, lengths, strict=True)):
        inputs["input_ids"][k, :, :n] = d["input_ids"]
        inputs["attention_mask"][k, :, :n] = 1
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    out = stacking.forward(skeleton, stacked, inputs, False, gens)
    out.loss.sum().backward()
    return skeleton, stacked, out


def _grads(skeleton, stacked, k):
    return {n: p.grad[k] for n, p in skeleton.named_parameters()
            if n in stacked and p.grad is not None}


def test_fused_attention_equals_eager_without_dropout():
    """Training step (members padded from 6 and 9 tokens) and shared evaluation batch."""
    config, seeds, lengths = _config(0.0), (3, 7), (6, 9)
    data = [_batch(s, n) for s, n in zip(seeds, lengths, strict=True)]
    eager, stacked, out_e = _stack_step(seeds, data, lengths, config, "eager")
    fused, _, out_f = _stack_step(seeds, data, lengths, config, "fused")
    assert torch.allclose(out_f.loss, out_e.loss, atol=1e-6, rtol=0)
    assert torch.allclose(out_f.logits, out_e.logits, atol=1e-6, rtol=0)
    for k in range(len(seeds)):
        ge, gf = _grads(eager, stacked, k), _grads(fused, stacked, k)
        assert ge.keys() == gf.keys() and len(ge) > 10
        for name in ge:
            assert torch.allclose(gf[name], ge[name], atol=1e-6, rtol=0), name
    shared = {"input_ids": data[1]["input_ids"], "attention_mask": torch.ones(ROWS, PADDED)}
    shared["attention_mask"][0, 7:] = 0
    with torch.no_grad():
        logits = [stacking.forward(m.eval(), stacked, shared, True).logits
                  for m in (eager, fused)]
    assert torch.allclose(logits[1], logits[0], atol=1e-6, rtol=0)


def test_with_attention_dropout_a_member_is_the_same_in_any_stack_and_is_its_single_run():
    """Seed 3 trains beside seed 7 (first place) and beside seed 5 (second place, other
    data, other length): its loss and gradients are the same, and its single run's (sdpa,
    torch seeded as the member's generator). Attention dropout changes them, so the masks
    are drawn (and drawn per member: its partner's masks would change them)."""
    config = _config(0.3)
    mine, own_length = _batch(3, 6), 6
    _, stacked, first = _stack_step((3, 7), [mine, _batch(7, 9)], (6, 9), config, "fused")
    first_grads = _grads(_, stacked, 0)
    second_sk, _, second = _stack_step((5, 3), [_batch(5, 9), mine], (9, 6), config, "fused")
    second_grads = _grads(second_sk, stacked, 1)
    assert torch.allclose(first.loss[0], second.loss[1], atol=1e-6, rtol=0)
    for name, grad in first_grads.items():
        assert torch.allclose(grad, second_grads[name], atol=1e-6, rtol=0), name

    single = _model(3, _config(0.3))  # its own config: the stack's is set to stacked attention
    assert single.config._attn_implementation == "sdpa"
    torch.manual_seed(103)
    loss = single(**mine, attention_mask=torch.ones(ROWS, own_length)).loss
    loss.backward()
    assert torch.allclose(first.loss[0], loss, atol=1e-6, rtol=0)
    params = dict(single.named_parameters())
    for name, grad in first_grads.items():
        assert torch.allclose(grad, params[name].grad, atol=1e-6, rtol=0), name

    undropped_sk, _, _ = _stack_step((3, 7), [mine, _batch(7, 9)], (6, 9), _config(0.0),
                                     "fused")
    undropped = _grads(undropped_sk, stacked, 0)
    assert max((g - undropped[n]).abs().max() for n, g in first_grads.items()) > 1e-4


class _Shapes(TorchDispatchMode):
    """The shape of every tensor an operator returns, and the attention kernels called."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.kernels += "scaled_dot_product" in str(func) and "backward" not in str(func)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("attention_p", [0.0, 0.1])
def test_the_fused_path_is_taken_and_makes_no_stack_of_scores(monkeypatch, attention_p):
    """No dropout: one SDPA call a layer for the whole stack, no [.., L, L] tensor at all (the
    CPU's flash kernel). Dropout: one call a member and layer (SDPA's math path on the CPU
    makes the member's own [B, H, l, l]), never the stack's [K, B, H, L, L]. Eager attention
    makes it, and so fails this test."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    seeds = (3, 7, 8)
    data = [_batch(s, PADDED) for s in seeds]
    with _Shapes() as seen:
        _stack_step(seeds, data, (PADDED,) * 3, _config(attention_p), "fused")
    members = 1 if attention_p == 0.0 else len(seeds)
    assert len(calls) == LAYERS * members
    assert all(shape == (ROWS * len(seeds) // members, HEADS, PADDED, 16) for shape in calls)
    stack_of_scores = len(seeds) * ROWS * HEADS * PADDED * PADDED
    squares = [s for s in seen.shapes if s[-2:] == (PADDED, PADDED)]
    assert all(torch.Size(s).numel() < stack_of_scores for s in squares), squares
    assert not squares if attention_p == 0.0 else squares

    with _Shapes() as eager:
        _stack_step(seeds, data, (PADDED,) * 3, _config(attention_p), "eager")
    assert (len(seeds), ROWS, HEADS, PADDED, PADDED) in eager.shapes


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "distilbert",
                                    "modernbert"])
@pytest.mark.parametrize("head", ["seq", "tok"])
def test_every_family_stacks_each_member_as_its_own_model_with_fused_attention(
        monkeypatch, family, head):
    import test_stacking

    prepare = stacking.prepare_skeleton

    def fused(model, attention="auto", max_length=None):
        assert prepare(model, "fused") == "fused"
        return "fused"

    monkeypatch.setattr(stacking, "prepare_skeleton", fused)
    test_stacking.test_every_family_stacks_each_member_as_its_own_model(family, head)


def test_auto_is_eager_on_a_cpu_as_before():
    """`auto` on the CPU runs the family's eager attention: a member's loss and gradients are
    bit for bit those of eager attention set by name."""
    config, seeds, lengths = _config(0.2, 0.1), (3, 7), (6, 9)
    data = [_batch(s, n) for s, n in zip(seeds, lengths, strict=True)]
    eager, stacked, out_e = _stack_step(seeds, data, lengths, config, "eager")
    auto, _, out_a = _stack_step(seeds, data, lengths, _config(0.2, 0.1), "auto")
    assert auto.config._attn_implementation == "blurbtune_stacked"
    assert torch.equal(out_a.loss, out_e.loss)
    for k in range(len(seeds)):
        ge, ga = _grads(eager, stacked, k), _grads(auto, stacked, k)
        assert all(torch.equal(ga[n], ge[n]) for n in ge)


def test_a_family_outside_the_attention_interface_runs_eager_named_in_one_line(caplog):
    from test_stabilizers import CONFIGS

    config = CONFIGS["deberta-v2"]()
    models = [_model(s, config) for s in (0, 1)]
    skeleton, _ = stacking.stack_models(models)
    with caplog.at_level(logging.INFO, logger="blurbtune"):
        assert stacking.prepare_skeleton(skeleton, "fused") == "eager"
    said = [r.getMessage() for r in caplog.records if "stacked attention" in r.getMessage()]
    assert said == ["stacked attention: model family 'deberta-v2' runs eager attention under "
                    "vmap (its disentangled attention is its own code, not transformers' "
                    "attention interface)"]
    assert skeleton.config._attn_implementation == "eager"


def test_a_members_attention_dropout_comes_from_its_generator_and_advances_it():
    """`drawing_from` hands SDPA's draws to the member's generator and leaves the process's
    generator where it was."""
    from blurbtune.stack_attention import drawing_from

    q = torch.randn(1, 2, 5, 4)
    own = torch.Generator().manual_seed(11)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with drawing_from(own):
        first = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(11)
    assert torch.equal(first, F.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    second_expected = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    with drawing_from(own):
        second = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(second, second_expected)


@pytest.mark.parametrize(("attention", "max_length", "expected"), [
    ("auto", 128, "eager"), ("auto", 255, "eager"), ("auto", 256, "auto"),
    ("auto", 512, "auto"), ("auto", None, "auto"), ("fused", 128, "fused"),
    ("eager", 512, "eager")])
def test_auto_takes_eager_on_short_tasks_on_every_device(attention, max_length, expected):
    """A task's max_length below `FUSED_FROM_LENGTH` (256, measured on an H200) sets eager
    attention whatever the device; a forced choice is kept; `auto` above it is the GPU's
    fused path (eager on a CPU, by name)."""
    skeleton, _ = stacking.stack_models([_model(s, _config(0.0, 0.0)) for s in (0, 1)])
    assert stacking.prepare_skeleton(skeleton, attention, max_length=max_length) == expected
    implementation = {"eager": "eager", "auto": "blurbtune_stacked",
                      "fused": "blurbtune_stacked_fused"}[expected]
    assert skeleton.config._attn_implementation == implementation
