"""ModernBERT end to end: model configs, a checkpoint laid out as the hub's, long context, every
task type on the tiny ModernBERT with stabilizers, and a stability preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, smoke_overrides
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tiny_runs import TASK_OF_TYPE, needs_fixtures

from blurbtune.config import compose
from blurbtune.errors import ConfigError
from blurbtune.families import encoder_parts
from blurbtune.models import load_model, load_tokenizer, tokenizer_fingerprint
from blurbtune.run import run

HUB_IDS = {
    "modernbert_base": "answerdotai/ModernBERT-base",
    "modernbert_large": "answerdotai/ModernBERT-large",
    "bioclinical_modernbert": "thomas-sounack/BioClinical-ModernBERT-base",
    "bioclinical_modernbert_large": "thomas-sounack/BioClinical-ModernBERT-large",
}


@pytest.fixture(scope="module")
def saved_modernbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ModernBERT saved as the hub's are: a masked-LM model and its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-modernbert")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_modernbert.py"),
                    str(folder)], check=True, capture_output=True, timeout=300)
    return folder


@pytest.mark.parametrize(("name", "hub_id"), sorted(HUB_IDS.items()))
def test_model_configs_name_the_hub_ids(name: str, hub_id: str) -> None:
    cfg = compose([f"model={name}"])
    assert cfg.model.name == name and cfg.model.name_or_path == hub_id
    assert cfg.model.attn_implementation == "sdpa" or torch.cuda.is_available()


def test_tiny_modernbert_tokenizer_gives_no_token_type_ids() -> None:
    cfg = compose(["model=tiny_modernbert", "task=chemprot"])
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    assert set(tokenizer("a gene", "a drug")) == {"input_ids", "attention_mask"}
    bert = load_tokenizer(compose(["model=tiny", "task=chemprot"]).model, cfg.task)
    assert "token_type_ids" in bert("a gene", "a drug")
    # the same vocabulary returning other inputs must not share cached tokenised splits
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(bert)


def test_pretrained_head_is_loaded_and_plays_the_pooler(saved_modernbert: Path) -> None:
    cfg = compose(["model=modernbert_base", f"model.name_or_path={saved_modernbert}",
                   "task=biosses"])
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    model = load_model(cfg.model, cfg.task, tokenizer)
    saved = load_file(saved_modernbert / "model.safetensors")
    # head.dense / head.norm come from the checkpoint like BERT's pretrained pooler ...
    for name in ("head.dense.weight", "head.norm.weight", "model.final_norm.weight"):
        assert torch.equal(model.get_parameter(name), saved[name]), name
    # ... while the classifier is new
    assert not any(key.startswith("classifier.") for key in saved)
    parts = encoder_parts(model)
    assert parts.pooler[0] == "head" and parts.head_prefixes == ["classifier"]
    assert [name for name, _ in parts.after_layers] == ["model.final_norm"]
    assert model.config._attn_implementation == "sdpa"


def test_long_context_within_the_position_limit() -> None:
    cfg = compose(["model=tiny_modernbert", "task=hoc", "task.max_length=2048"])
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    model = load_model(cfg.model, cfg.task, tokenizer)
    enc = tokenizer(" ".join(["tumour"] * 1500), truncation=True, max_length=2048,
                    return_tensors="pt")
    assert enc["input_ids"].shape[1] == 1502  # > 512, nothing cut
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, len(cfg.task.labels))
    too_long = compose(["model=tiny_modernbert", "task=hoc", "task.max_length=8193"])
    with pytest.raises(ConfigError, match=r"task.max_length=8193 exceeds .* 8192"):
        load_model(too_long.model, too_long.task, tokenizer)


def run_in_process(overrides: list[str], run_dir: Path) -> dict:
    run(compose([*overrides, f"+run_dir={run_dir}"]))
    return json.loads((run_dir / "results.json").read_text())


@needs_fixtures
@pytest.mark.parametrize("task_type", sorted(TASK_OF_TYPE))
def test_every_task_type_on_a_saved_modernbert(task_type: str, saved_modernbert: Path,
                                               tmp_path: Path, cache_dir: Path) -> None:
    name = TASK_OF_TYPE[task_type]
    results = run_in_process(smoke_overrides(
        name, cache_dir, "model=modernbert_base", f"model.name_or_path={saved_modernbert}",
        "stabilizer=[llrd,reinit_top]"), tmp_path)
    assert results["status"] == "completed", results.get("error")
    assert results["model"] == "modernbert_base" and results["stabilizer"] == "llrd+reinit_top"
    rows = [json.loads(line) for line in (tmp_path / "predictions" / "test.jsonl").open()]
    assert len(rows) == results["n_examples"]["test"]
    groups = {g["group"]: g for g in
              json.loads((tmp_path / "param_groups.json").read_text())["groups"]}
    assert [g for g, row in groups.items() if row["reinitialised"]] == ["layer.3", "pooler"]
    lr = results["lr"]
    assert groups["layer.3"]["lr"] == pytest.approx(lr * 0.9)
    assert groups["embeddings"]["lr"] == pytest.approx(lr * 0.9**5)


@needs_fixtures
def test_a_stability_preset_composes_with_tiny_modernbert(tmp_path: Path,
                                                         cache_dir: Path) -> None:
    cfg = compose(["experiment=stability_biosses", "model=tiny_modernbert"])
    OmegaConf.resolve(cfg)
    assert cfg.name == "stability-tiny_modernbert"
    assert cfg.hydra.sweeper.params.stabilizer == "none,freeze_lower,llrd,reinit_top"
    # one point of its sweep, shrunk to the smoke size
    results = run_in_process(smoke_overrides("biosses", cache_dir, "model=tiny_modernbert",
                                             "stabilizer=freeze_lower", "seed=3"), tmp_path)
    assert results["status"] == "completed", results.get("error")
    assert results["stabilizer_knobs"] == {"freeze.embeddings": True, "freeze.layers": 3}


@pytest.mark.parametrize("attention", ["eager", "fused"])
@pytest.mark.parametrize("head", ["seq", "seq-mean", "tok"])
def test_a_stacked_member_keeps_the_sliding_window(attention: str, head: str) -> None:
    """Local attention over 8 tokens (4 either side) on members of 14 and 20 tokens: a stacked
    member's loss, logits and gradients are its single run's (fp32, no dropout; within 1e-6,
    gradients relative to the tensor's largest when that exceeds 1), its sliding-window layers
    seeing no farther than alone. ``seq-mean``: the head pools by the mean over the padding
    mask (``classifier_pooling: mean``, as the hub's ModernBERT-base/-large configs set), so a
    padded member's mean is over its own tokens only."""
    from test_stabilizers import CONFIGS
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from blurbtune import stacking

    auto = AutoModelForTokenClassification if head == "tok" else \
        AutoModelForSequenceClassification

    def make(seed: int) -> torch.nn.Module:
        config = CONFIGS["modernbert"]()
        config.local_attention, config.num_labels = 8, 3
        config.classifier_pooling = "mean" if head == "seq-mean" else "cls"
        torch.manual_seed(seed)
        return auto.from_config(config).train()

    seeds, rows, lengths = (3, 7), 2, (14, 20)
    assert "sliding_attention" in make(0).config.layer_types
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 100, (rows, n), generator=gen) for n in lengths]
    labels = [torch.randint(0, 3, (rows, n) if head == "tok" else (rows,), generator=gen)
              for n in lengths]
    singles = [make(s) for s in seeds]
    alone = [m(input_ids=i, attention_mask=torch.ones_like(i), labels=y)
             for m, i, y in zip(singles, ids, labels, strict=True)]
    for out in alone:
        out.loss.backward()

    skeleton, stacked = stacking.stack_models([make(s) for s in seeds])
    assert stacking.prepare_skeleton(skeleton, attention) == attention
    padded = max(lengths)
    inputs = {"input_ids": torch.zeros(2, rows, padded, dtype=torch.long),
              "attention_mask": torch.zeros(2, rows, padded, dtype=torch.long),
              "labels": torch.full((2, rows, padded), -100) if head == "tok" else
              torch.stack(labels)}
    for k, n in enumerate(lengths):
        inputs["input_ids"][k, :, :n] = ids[k]
        inputs["attention_mask"][k, :, :n] = 1
        if head == "tok":
            inputs["labels"][k, :, :n] = labels[k]
    out = stacking.forward(skeleton, stacked, inputs, False,
                           [torch.Generator().manual_seed(s) for s in seeds],
                           stacking.mask_form(skeleton))
    out.loss.sum().backward()
    params = dict(skeleton.named_parameters())
    for k, (single, own) in enumerate(zip(singles, alone, strict=True)):
        logits = out.logits[k, :, :lengths[k]] if head == "tok" else out.logits[k]
        assert torch.allclose(out.loss[k], own.loss, atol=1e-6, rtol=0)
        assert torch.allclose(logits, own.logits, atol=1e-6, rtol=0)
        for name, p in single.named_parameters():
            scale = max(1.0, float(p.grad.abs().max()))  # embedding gradients reach ~10
            assert float((params[name].grad[k] - p.grad).abs().max()) <= 1e-6 * scale, name
