"""Every config file composes, and the composed values are what the yaml files promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from blurbtune.blurb import tasks
from blurbtune.config import compose, config_dir, dirname
from blurbtune.run import stabilizer_knobs, stabilizer_name

CONF = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "task", "optimizer", "stabilizer", "trainer"])
def test_every_option_of_every_group_composes_and_resolves(group: str) -> None:
    assert options(group), f"no configs in {group}/"
    for option in options(group):
        cfg = compose([f"{group}={option}"])
        OmegaConf.resolve(cfg)  # every interpolation resolves
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_with_the_tiny_model(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}", "model=tiny"])
    OmegaConf.resolve(cfg)
    assert cfg.model.name == "tiny"


def test_model_configs_name_real_hub_ids() -> None:
    expected = {
        "pubmedbert": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",
        "pubmedbert_large": "microsoft/BiomedNLP-BiomedBERT-large-uncased-abstract",
        "pubmedelectra": "microsoft/BiomedNLP-BiomedELECTRA-base-uncased-abstract",
        "biobert": "dmis-lab/biobert-base-cased-v1.1",
        "scibert": "allenai/scibert_scivocab_uncased",
        "bert_base": "bert-base-uncased",
        "roberta_base": "roberta-base",
        "biolinkbert": "michiyasunaga/BioLinkBERT-base",
    }
    for name, hub_id in expected.items():
        assert compose([f"model={name}"]).model.name_or_path == hub_id


def test_minilm_resolves_to_the_offline_package_folder() -> None:
    path = Path(compose(["model=minilm"]).model.name_or_path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_local_path_override() -> None:
    cfg = compose(["model=pubmedbert", "model.name_or_path=/some/local/dir"])
    assert cfg.model.name_or_path == "/some/local/dir"


def test_thirteen_blurb_tasks_with_their_facts() -> None:
    reg = tasks()
    assert len(reg) == 13
    assert {t.type for t in reg.values()} == {
        "ner", "pico", "relation", "similarity", "doc_classification", "qa"}
    for name, task in reg.items():
        cfg = compose([f"task={name}"])
        assert cfg.task.folder == task.folder
        assert cfg.optimizer.lr == task.lr and cfg.trainer.max_epochs == task.epochs
        assert cfg.data_dir  # defaults to $BLURB_DATA_DIR or data/blurb


def test_stabilizers_compose_with_overridable_knobs() -> None:
    cfg = compose(["stabilizer=[llrd,reinit_top]", "stabilizer.llrd.decay=0.8",
                   "stabilizer.reinit.layers=2"])
    assert stabilizer_name(cfg.stabilizer) == "llrd+reinit_top"
    assert stabilizer_knobs(cfg.stabilizer) == {
        "llrd.decay": 0.8, "reinit.layers": 2, "reinit.pooler": True}
    assert stabilizer_name(compose([]).stabilizer) == "none"
    freeze = compose(["stabilizer=freeze_lower", "stabilizer.freeze.layers=5"]).stabilizer
    assert freeze.freeze.layers == 5 and stabilizer_name(freeze) == "freeze_lower"


def test_run_folder_names_come_from_overrides() -> None:
    assert dirname("seed=0,stabilizer=llrd") == "seed=0,stabilizer=llrd"
    assert dirname("model.name_or_path=/a/b,seed=1") == "model.name_or_path=_a_b,seed=1"
    assert dirname("") == "default"
    cfg = compose(["seed=3", "stabilizer=llrd"])
    assert cfg.hydra.sweep.dir == "outputs/multirun/pubmedbert-biosses"


def test_seed_zero_is_kept() -> None:
    assert compose(["seed=0"]).seed == 0
