"""Stacked seeds: each member of a stack is the single run of its seed.

On the CPU in fp32, with dropout on, every member's scores, dev history, training loss,
gradient norms and similarity predictions equal its single run's to 1e-5 (relative, or absolute
near 0): batched kernels add in another order, and after a few AdamW steps MiniLM's similarity
predictions (~1.6) differ by ~1e-6. Predicted labels and tags are identical. The comparison
can fail: a stack whose members share one dropout generator fails it.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

import pytest
import torch
from tiny_runs import needs_fixtures, tiny_config

from blurbtune import stacking
from blurbtune.run import run

pytestmark = needs_fixtures

SEEDS = (0, 1)
COMMON = ("trainer.max_epochs=2", "optimizer.lr=1e-3")
# (task, stabilizer): every task type (similarity, multi-label document classification,
# relation, NER, PICO, QA); every stabilizer, a composition, and the recommended choice.
# BIOSSES on real weights: the tiny random model predicts a near-constant similarity there
# (spread ~1e-5), whose Pearson r is too ill-conditioned to compare; MiniLM's predictions
# spread (std ~0.05) in 2 epochs.
CASES = [("biosses", "none"), ("biosses", "reinit_top"), ("hoc", "freeze_lower"),
         ("chemprot", "llrd"), ("ncbi_disease", "[llrd,reinit_top]"),
         ("ncbi_disease", "recommended"), ("ebmnlp", "none"), ("pubmedqa", "reinit_top"),
         ("hoc", "lora"), ("ncbi_disease", "bitfit")]
MODEL = {"biosses": ("model=minilm", "optimizer.lr=5e-4", "task.max_length=64")}
TOL = 1e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _predictions(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions" / name).read_text().splitlines()]


def _close(a: float, b: float, tol: float = TOL) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def assert_same_run(single: Path, member: Path) -> None:
    """`member` (a stack's) is `single`'s run: scores, history, gradients, predictions."""
    a, b = _results(single), _results(member)
    assert a["status"] == b["status"] == "completed"
    for key in ("seed", "data_seed", "init_seed", "stabilizer", "stabilizer_knobs",
                "best_epoch", "epochs_run", "baseline", "collapsed", "n_examples"):
        assert a[key] == b[key], key
    if a["task_type"] == "similarity":  # Pearson r of near-equal predictions is ill-posed
        spread = statistics.pstdev(r["pred"] for r in _predictions(single, "test.jsonl"))
        assert spread > 1e-3, f"predictions spread {spread:.1e}: their r cannot be compared"
    for split in ("dev", "test"):
        for which in ("best", "last"):
            assert _close(a[split][which], b[split][which]), (split, which)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert (ha["epoch"], ha["step"]) == (hb["epoch"], hb["step"])
        assert _close(ha["dev"], hb["dev"]) and _close(ha["train_loss"], hb["train_loss"])
        assert ha["lr_top"] == hb["lr_top"]
    for window in ("early", "whole"):
        ga = a["diagnostics"]["grad_norm"][window]
        gb = b["diagnostics"]["grad_norm"][window]
        assert ga.keys() == gb.keys()
        assert all(_close(ga[k], gb[k], 1e-4) for k in ga), window
    for name in ("dev.jsonl", "test.jsonl", "test_last.jsonl"):
        pa, pb = _predictions(single, name), _predictions(member, name)
        assert [(r["id"], r["gold"]) for r in pa] == [(r["id"], r["gold"]) for r in pb]
        if a["task_type"] == "similarity":
            assert all(_close(x["pred"], y["pred"]) for x, y in zip(pa, pb, strict=True))
        else:
            assert [r["pred"] for r in pa] == [r["pred"] for r in pb], name


def _singles_and_stack(root: Path, cache: Path, *overrides: str) -> tuple[list[Path], Path]:
    singles = []
    for seed in SEEDS:
        out = root / f"single-{seed}"
        run(tiny_config(out, cache, *COMMON, *overrides, f"seed={seed}"))
        singles.append(out)
    stack = root / "stack"
    run(tiny_config(stack, cache, *COMMON, *overrides, f"stack=[{','.join(map(str, SEEDS))}]"))
    return singles, stack


@pytest.mark.parametrize("task, stabilizer", CASES)
def test_each_member_of_a_stack_is_its_single_run(tmp_path, cache, task, stabilizer):
    singles, stack = _singles_and_stack(tmp_path, cache, f"task={task}",
                                        f"stabilizer={stabilizer}", *MODEL.get(task, ()))
    for seed, single in zip(SEEDS, singles, strict=True):
        member = stack / f"seed={seed}"
        assert_same_run(single, member)
        record = _results(member)["stack"]
        assert (record["size"], record["members"], record["position"]) == (
            len(SEEDS), [{"seed": s} for s in SEEDS], SEEDS.index(seed))


def test_a_stack_whose_members_share_dropout_draws_fails_the_comparison(
        tmp_path, cache, monkeypatch):
    """The check above can fail: members drawing dropout from one generator are not their
    single runs (the training loss and gradients differ from the first step)."""
    vmap_rule = stacking._MemberNoise.vmap

    def shared(info, in_dims, like, keep):
        gens = stacking._LOCAL.generators
        stacking._LOCAL.generators = [gens[0]] * len(gens)
        try:
            return vmap_rule(info, in_dims, like, keep)
        finally:
            stacking._LOCAL.generators = gens

    singles, _ = _singles_and_stack(tmp_path, cache, "task=hoc")
    stack = tmp_path / "shared"
    with monkeypatch.context() as m:
        m.setattr(stacking._MemberNoise, "vmap", staticmethod(shared))
        run(tiny_config(stack, cache, *COMMON, "task=hoc", "stack=[0,1]"))
    for seed, single in zip(SEEDS, singles, strict=True):  # one stream, read by both in turn
        with pytest.raises(AssertionError, match="train_loss|_close"):
            assert_same_run(single, stack / f"seed={seed}")


# ---------------------------------------------------------------- the parts, one at a time


def test_dropout_noise_of_a_padded_member_is_its_single_runs_noise():
    """A member padded from 5 to 7 tokens draws the noise of its own [2, 5, 3] tensor, in the
    order F.dropout draws it, laid into the padded shape; an unpadded member draws its own."""
    keep, lengths, padded = 0.9, [5, 7], 7
    like = torch.zeros(2, 2, padded, 3)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    with stacking.member_draws(gens, lengths, padded):
        noise = torch.vmap(lambda x: stacking._MemberNoise.apply(x, keep),
                           randomness="error")(like)
    torch.manual_seed(11)
    own = torch.nn.functional.dropout(torch.ones(2, 5, 3), 1 - keep, training=True)
    assert torch.equal(noise[0, :, :5], own) and not noise[0, :, 5:].any()
    torch.manual_seed(12)
    assert torch.equal(noise[1], torch.nn.functional.dropout(torch.ones(2, 7, 3), 1 - keep))


def test_stack_length_avoids_other_axis_sizes_only_when_members_differ():
    assert stacking.stack_length([6, 6], {6}) == 6  # nothing padded: no axis to tell apart
    assert stacking.stack_length([5, 6], {6, 7, 9}) == 8
    assert stacking.stack_length([5, 6], set()) == 6


def test_per_member_clipping_is_clip_grad_norm_on_each_member():
    gen = torch.Generator().manual_seed(0)
    members = [[torch.randn(4, 3, generator=gen) * s, torch.randn(5, generator=gen) * s]
               for s in (0.1, 3.0)]  # one member under the threshold, one over
    stacked = [torch.nn.Parameter(torch.stack([m[i] for m in members])) for i in range(2)]
    for p, i in zip(stacked, range(2), strict=True):
        p.grad = torch.stack([m[i] for m in members])
    norms = stacking.clip_members_(stacked, 1.0, members=2)
    for k, grads in enumerate(members):
        singles = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(singles, grads, strict=True):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(singles, 1.0)
        assert torch.allclose(norms[k], total)
        for p, q in zip(singles, stacked, strict=True):
            assert torch.allclose(p.grad, q.grad[k], atol=1e-7)


# ---------------------------------------------------------------- a stack's life


RESUME = ("task=hoc", "trainer.max_epochs=3")
COMPARED = ("dev", "test", "history", "best_epoch", "epochs_run", "baseline", "collapsed",
            "diagnostics")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted-stack")
    run(tiny_config(out, cache, *COMMON, *RESUME, "stack=[0,1]"))
    return out


def _interrupt_at(monkeypatch, epoch: int, batch: int) -> None:
    import os
    import signal

    from blurbtune.module import FineTuner

    def on_train_batch_end(self, outputs, batch_, batch_idx):
        if self.current_epoch == epoch and batch_idx == batch:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FineTuner, "on_train_batch_end", on_train_batch_end)


def test_an_interrupted_stack_resumes_to_the_uninterrupted_stack(tmp_path, cache,
                                                                 uninterrupted, monkeypatch):
    cfg = tiny_config(tmp_path, cache, *COMMON, *RESUME, "stack=[0,1]")
    with monkeypatch.context() as m:
        _interrupt_at(m, epoch=1, batch=1)
        with pytest.raises(SystemExit):
            run(cfg)
    for seed in SEEDS:
        stopped = _results(tmp_path / f"seed={seed}")
        assert stopped["status"] == "interrupted"
        assert [h["epoch"] for h in stopped["history"]] == [0]
        assert (tmp_path / f"seed={seed}" / "checkpoints" / "last.ckpt").is_file()
    run(cfg)
    for seed in SEEDS:
        resumed, whole = _results(tmp_path / f"seed={seed}"), _results(
            uninterrupted / f"seed={seed}")
        assert resumed["status"] == "completed" and resumed["resumed_from"]
        assert {k: resumed[k] for k in COMPARED} == {k: whole[k] for k in COMPARED}
        for name in ("dev.jsonl", "test.jsonl", "test_last.jsonl"):
            assert _predictions(tmp_path / f"seed={seed}", name) == _predictions(
                uninterrupted / f"seed={seed}", name)
        assert not (tmp_path / f"seed={seed}" / "checkpoints").exists()


def test_a_members_checkpoint_resumes_as_its_single_run(tmp_path, cache, monkeypatch):
    """A member's checkpoint is the one its single run would write: the single command of
    that seed resumes from it and ends as the uninterrupted single run."""
    whole = tmp_path / "whole"
    run(tiny_config(whole, cache, *COMMON, *RESUME, "seed=1"))
    stack = tmp_path / "stack"
    with monkeypatch.context() as m:
        _interrupt_at(m, epoch=1, batch=1)
        with pytest.raises(SystemExit):
            run(tiny_config(stack, cache, *COMMON, *RESUME, "stack=[0,1]"))
    member = stack / "seed=1"
    run(tiny_config(member, cache, *COMMON, *RESUME, "seed=1"))
    assert _results(member)["resumed_from"]
    assert_same_run(whole, member)


def test_finished_members_are_skipped_and_the_stack_is_formed_from_the_rest(
        tmp_path, cache, caplog):
    import logging

    run(tiny_config(tmp_path / "seed=0", cache, *COMMON, "task=hoc", "seed=0"))
    before = (tmp_path / "seed=0" / "results.json").read_bytes()
    with caplog.at_level(logging.INFO, logger="blurbtune"):
        run(tiny_config(tmp_path, cache, *COMMON, "task=hoc", "stack=[0,1,2]"))
    assert (tmp_path / "seed=0" / "results.json").read_bytes() == before
    assert any("already completed, skipping" in r.getMessage() for r in caplog.records)
    for seed in (1, 2):
        record = _results(tmp_path / f"seed={seed}")
        assert record["status"] == "completed"
        assert record["stack"]["members"] == [{"seed": 1}, {"seed": 2}]


def test_a_diverged_member_stops_and_the_others_go_on(tmp_path, cache, monkeypatch):
    """Member 1's loss turns NaN at step 5: it is recorded diverged with its dev history up to
    then and no checkpoint; member 0 trains on and is still its single run."""
    from blurbtune import module as module_code

    forward = module_code.stacking.forward

    def failing(skeleton, stacked, inputs, shared_inputs, generators=None, mask="additive"):
        out = forward(skeleton, stacked, inputs, shared_inputs, generators, mask)
        if skeleton.training and failing.steps == 5:
            out.loss = out.loss.clone()
            out.loss[1] = float("nan")
        failing.steps += skeleton.training
        return out

    failing.steps = 0
    single = tmp_path / "single"
    run(tiny_config(single, cache, *COMMON, "task=hoc", "trainer.max_epochs=3", "seed=0"))
    stack = tmp_path / "stack"
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.setattr(module_code.stacking, "forward", failing)
        run(tiny_config(stack, cache, *COMMON, "task=hoc", "trainer.max_epochs=3",
                        "stack=[0,1]"))
    assert not [w for w in caught if "requires_grad" in str(w.message)]  # the check detaches
    diverged = _results(stack / "seed=1")
    assert diverged["status"] == "diverged"
    # the epoch as the bar counts it: the second of three (history's epoch 0 is the first)
    assert diverged["error"] == "DivergedError: training loss became nan at epoch 2/3, step 5"
    assert diverged["stage"] == "training"
    assert [h["epoch"] for h in diverged["history"]] == [0]
    assert diverged["checkpoint"] is None and not (stack / "seed=1" / "checkpoints").exists()
    assert not (stack / "seed=1" / "predictions").exists()
    assert_same_run(single, stack / "seed=0")


def test_a_stack_refuses_what_would_not_train_each_member_exactly(monkeypatch):
    from omegaconf import OmegaConf

    from blurbtune.errors import ConfigError

    base = {"model": {"config": {"model_type": "bert"}}, "trainer": {}}
    for trainer, said in (({"precision": "16-mixed"}, "fp16 shares one gradient scaler"),
                          ({"devices": 2}, "a stack trains on one device"),
                          ({"strategy": "ddp"}, "a stack trains on one device"),
                          ({"compile": True}, "trainer.compile=true"),
                          ({"precision": "bf16-mixed", "accelerator": "cpu"},
                           "bf16-mixed on a CPU")):
        with pytest.raises(ConfigError, match=said):
            stacking.check_stackable(OmegaConf.create({**base, "trainer": trainer}))
    bf16 = {**base, "trainer": {"precision": "bf16-mixed", "accelerator": "gpu"}}
    stacking.check_stackable(OmegaConf.create(bf16))
    with monkeypatch.context() as m:  # auto picks the CPU where there is no CUDA device
        m.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ConfigError, match="bf16-true on a CPU"):
            stacking.check_stackable(OmegaConf.create(
                {**base, "trainer": {"precision": "bf16-true"}}))


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2",
                                    "deberta-v2-conv", "distilbert", "modernbert",
                                    "modernbert-mean"])
@pytest.mark.parametrize("head", ["seq", "tok"])
def test_every_family_stacks_each_member_as_its_own_model(family, head):
    """A training step with dropout on, two members padded from 5 and 7 tokens to one length:
    each member's loss and gradients are its own model's, run alone from its seed.
    ``modernbert-mean``: its head mean-pools over the padding mask, as the hub's ModernBERTs."""
    from test_stabilizers import CONFIGS
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForSequenceClassification if head == "seq" else \
        AutoModelForTokenClassification

    def make(seed):
        config = CONFIGS[family.removesuffix("-mean")]()
        if family.endswith("-mean"):
            config.classifier_pooling = "mean"
        config.num_labels = 3
        config.problem_type = "single_label_classification" if head == "seq" else None
        torch.manual_seed(seed)
        return auto.from_config(config).train()

    seeds, rows, lengths = (3, 7), 3, (5, 7)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 100, (rows, n), generator=gen) for n in lengths]
    labels = [torch.randint(0, 3, (rows,) if head == "seq" else (rows, n), generator=gen)
              for n in lengths]
    singles = []
    losses = []
    for k, seed in enumerate(seeds):
        model = make(seed)
        torch.manual_seed(100 + seed)
        loss = model(input_ids=ids[k], attention_mask=torch.ones_like(ids[k]),
                     labels=labels[k]).loss
        loss.backward()
        singles.append(model)
        losses.append(loss.detach())
    skeleton, stacked = stacking.stack_models([make(s) for s in seeds])
    stacking.prepare_skeleton(skeleton)
    length = stacking.stack_length(list(lengths), stacking.axis_sizes(skeleton.config) | {rows})
    inputs = {"input_ids": torch.zeros(2, rows, length, dtype=torch.long),
              "attention_mask": torch.zeros(2, rows, length, dtype=torch.long),
              "labels": torch.full((2, rows, length), -100)}
    for k, n in enumerate(lengths):
        inputs["input_ids"][k, :, :n] = ids[k]
        inputs["attention_mask"][k, :, :n] = 1
        if head == "tok":
            inputs["labels"][k, :, :n] = labels[k]
    if head == "seq":
        inputs["labels"] = torch.stack(labels)
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    out = stacking.forward(skeleton, stacked, inputs, False, gens, stacking.mask_form(skeleton))
    out.loss.sum().backward()
    assert torch.allclose(out.loss.detach(), torch.stack(losses), atol=1e-6)
    params = dict(skeleton.named_parameters())
    for k, single in enumerate(singles):
        for name, p in single.named_parameters():
            if p.grad is not None:
                assert torch.allclose(params[name].grad[k], p.grad, atol=1e-5), name


def test_an_encoder_given_its_mask_by_position_is_refused():
    """A stack gives the family's mask form to the base model through its keyword
    ``attention_mask``; a head passing the mask by position would leave the encoder the 2-D
    mask, so the stack stops with an error naming the base model."""
    from types import SimpleNamespace

    from test_stabilizers import CONFIGS
    from transformers import AutoModelForSequenceClassification

    class Positional(torch.nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.inner = AutoModelForSequenceClassification.from_config(CONFIGS["bert"]())
            self.config = self.inner.config

        @property
        def base_model(self) -> torch.nn.Module:
            return self.inner.bert

        def forward(self, input_ids, attention_mask):
            pooled = self.inner.bert(input_ids, attention_mask).pooler_output
            return SimpleNamespace(logits=self.inner.classifier(pooled))

    skeleton, stacked = stacking.stack_models([Positional(3).eval(), Positional(7).eval()])
    ids = torch.randint(3, 100, (2, 6))
    with pytest.raises(stacking.StackError, match="BertModel was called without "
                                                  "attention_mask by keyword"):
        stacking.forward(skeleton, stacked, {"input_ids": ids,
                                             "attention_mask": torch.ones_like(ids)}, True)


def test_a_family_that_cannot_be_stacked_is_refused_naming_it_and_the_fallback(monkeypatch):
    from dataclasses import replace

    from omegaconf import OmegaConf

    from blurbtune.errors import ConfigError
    from blurbtune.families import FAMILIES

    monkeypatch.setitem(FAMILIES, "bert", replace(FAMILIES["bert"], stack_mask=None,
                                                  stack_note="its mask branches on the data"))
    cfg = OmegaConf.create({"model": {"config": {"model_type": "bert"}}, "trainer": {}})
    with pytest.raises(ConfigError, match=r"model family 'bert' cannot be stacked \(its mask "
                                          r"branches on the data\); run the seeds unstacked"):
        stacking.check_stackable(cfg)


def test_verify_reruns_a_member_in_its_stack_and_finds_it_identical(tmp_path, cache):
    from blurbtune.verify import verify

    run(tiny_config(tmp_path / "stack", cache, *COMMON, "task=hoc", "stack=[0,1]"))
    same, lines = verify(tmp_path / "stack" / "seed=1")
    assert same, lines
    assert lines[0] == "identical: metrics and predictions reproduced"


@pytest.mark.parametrize("stabilizer", ["lora", "freeze_lower", "bitfit"])
def test_a_stack_shares_the_frozen_pretrained_weights(tmp_path, stabilizer):
    """Members loaded from one pretrained folder hold its frozen tensors once: only what
    trains (and what a seed draws: the head) is stacked K times."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from blurbtune.config import compose
    from blurbtune.models import package_path
    from blurbtune.run import build_members

    folder = tmp_path / "encoder"
    tok = AutoTokenizer.from_pretrained(package_path("data/tiny_tokenizer"))
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = compose(["model=tiny", f"model.name_or_path={folder}", f"stabilizer={stabilizer}",
                   "dry_run=true", "task=hoc"])
    _, _, built, _ = build_members(cfg, [{"seed": s, "data_seed": s, "init_seed": s}
                                         for s in (0, 1, 2)])
    trainable = {n for n, p in built[0].named_parameters() if p.requires_grad}
    single = sum(p.numel() for p in built[0].parameters())
    trains = sum(p.numel() for p in built[0].parameters() if p.requires_grad)
    skeleton, stacked = stacking.stack_models(built)  # built[0] becomes the skeleton
    assert {n for n, _ in skeleton.named_parameters() if n in stacked} == trainable
    assert sum(p.numel() for p in skeleton.parameters()) == (single - trains) + 3 * trains


@pytest.mark.parametrize("value, said", [
    ("[0,0]", "a member is named twice"), ("[]", "expected a non-empty list of seeds"),
    ("abc", "expected a non-empty list of seeds"), ("[-1,2]", "seed=-1 is not a seed"),
    ("[{seed: 0, lr: 1}]", "each member is a seed or a mapping"),
])
def test_a_bad_stack_is_one_line(tmp_path, cache, value, said):
    from blurbtune.errors import ConfigError

    with pytest.raises(ConfigError, match=said):
        run(tiny_config(tmp_path, cache, f"stack={value}"))
    assert not any(tmp_path.iterdir())  # nothing written
