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
