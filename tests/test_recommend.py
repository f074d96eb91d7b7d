"""`stabilizer=recommended` (Tinn et al.'s findings) and the stabilizer registry.

Each branch is checked on tiny models of every family against answers written out by hand
from the paper's sentences; the registry against the yaml files read with PyYAML.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_stabilizers import CONFIGS
from tiny_runs import needs_fixtures, tiny_config
from transformers import AutoModelForTokenClassification

from blurbtune.config import compose
from blurbtune.errors import ConfigError
from blurbtune.models import package_path
from blurbtune.recommend import recommend
from blurbtune.report.collect import flatten
from blurbtune.run import run
from blurbtune.stabilizer_config import check_stabilizer, registry, resolve

STABILIZER_DIR = Path(package_path("conf", "stabilizer"))

# (family, layers, task type, training examples) -> (stabilizer, words the reason must hold)
CASES = [
    # "For low-resource text similarity tasks, such as BIOSSES, reinitializing the top layers
    # is the optimal strategy." It comes first, whatever the model.
    ("bert", 12, "similarity", 64, "reinit_top", "64 training examples <= 1000"),
    ("bert", 24, "similarity", 1000, "reinit_top", "1000 training examples <= 1000"),
    ("electra", 12, "similarity", 64, "reinit_top", "low-resource similarity"),
    ("modernbert", 4, "similarity", 64, "reinit_top", "low-resource similarity"),
    ("distilbert", 4, "similarity", 10, "reinit_top", "low-resource similarity"),
    # "layerwise decay is more effective for BERT-LARGE and ELECTRA models"
    ("electra", 12, "ner", 5000, "llrd", "ELECTRA"),
    ("electra", 4, "qa", 450, "llrd", "ELECTRA"),
    ("electra", 24, "relation", 5000, "llrd", "ELECTRA, 24 layers >= 24: large"),
    ("bert", 24, "ner", 5000, "llrd", "24 layers >= 24: large"),
    ("bert", 24, "similarity", 1001, "llrd", "24 layers"),
    ("roberta", 24, "pico", 5000, "llrd", "24 layers"),
    ("xlm-roberta", 24, "ner", 5000, "llrd", "24 layers"),
    ("deberta-v2", 24, "doc_classification", 5000, "llrd", "24 layers"),
    ("modernbert", 28, "ner", 5000, "llrd", "28 layers"),
    # "freezing lower layers is helpful for standard BERT-BASE models"
    ("bert", 12, "ner", 5000, "freeze_lower", "BERT, 12 layers: base size"),
    ("bert", 12, "similarity", 1001, "freeze_lower", "BERT, 12 layers"),
    # none of the findings: plain fine-tuning
    ("bert", 4, "ner", 5000, "none", "no finding applies to bert with 4 layers on ner"),
    ("roberta", 12, "ner", 5000, "none", "roberta with 12 layers"),
    ("xlm-roberta", 12, "qa", 5000, "none", "xlm-roberta with 12 layers"),
    ("deberta-v2", 12, "relation", 5000, "none", "deberta-v2 with 12 layers"),
    ("distilbert", 6, "ner", 5000, "none", "distilbert with 6 layers"),
    ("modernbert", 22, "qa", 5000, "none", "modernbert with 22 layers"),
]


def yaml_defaults(name: str) -> dict:
    return yaml.safe_load((STABILIZER_DIR / f"{name}.yaml").read_text()) or {}


@pytest.mark.parametrize(("family", "layers", "task_type", "n_train", "expected", "why"), CASES)
def test_recommended_branch(family, layers, task_type, n_train, expected, why) -> None:
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(CONFIGS[family](hidden=8, layers=layers))
    stab = compose(["stabilizer=recommended"]).stabilizer
    applied = resolve(stab, model, task_type, n_train)

    assert applied["stabilizer"] == expected
    assert applied["stabilizer_choice"].startswith(f"recommended -> {expected} (")
    assert why in applied["stabilizer_choice"]
    sections = yaml_defaults(expected)  # the chosen stabilizer at its own defaults
    assert applied["sections"] == sections
    assert applied["stabilizer_knobs"] == {
        f"{section}.{knob}": value for section, knobs in sections.items()
        for knob, value in knobs.items()}


def test_the_doc_example() -> None:
    assert str(recommend("electra", 12, "ner", 5000)) == "recommended -> llrd (ELECTRA)"


def test_low_resource_threshold_is_a_knob() -> None:
    model = AutoModelForTokenClassification.from_config(CONFIGS["bert"](hidden=8, layers=12))
    stab = compose(["stabilizer=recommended", "stabilizer.recommended.low_resource=50"]).stabilizer
    assert resolve(stab, model, "similarity", 64)["stabilizer"] == "freeze_lower"
    assert resolve(stab, model, "similarity", 50)["stabilizer"] == "reinit_top"


def test_explicit_stabilizers_are_applied_as_asked() -> None:
    model = AutoModelForTokenClassification.from_config(CONFIGS["electra"](hidden=8, layers=4))
    stab = compose(["stabilizer=[llrd,reinit_top]", "stabilizer.llrd.decay=0.8"]).stabilizer
    applied = resolve(stab, model, "similarity", 64)
    assert applied == {"stabilizer": "llrd+reinit_top", "stabilizer_choice": None,
                       "stabilizer_knobs": {"llrd.decay": 0.8, "reinit.layers": 1,
                                            "reinit.pooler": True},
                       "sections": {"llrd": {"decay": 0.8},
                                    "reinit": {"layers": 1, "pooler": True}}}


def test_registry_is_what_the_yaml_files_say() -> None:
    expected = {}
    for path in sorted(STABILIZER_DIR.glob("*.yaml")):
        for section, knobs in (yaml.safe_load(path.read_text()) or {}).items():
            expected[section] = (path.stem, knobs)
    assert {k: (s.name, s.defaults) for k, s in registry().items()} == expected
    assert set(expected) == {"freeze", "llrd", "reinit", "recommended", "lora", "bitfit"}


def test_recommended_does_not_combine_with_another_stabilizer() -> None:
    with pytest.raises(ConfigError, match=r"recommended .* stabilizer\.llrd"):
        check_stabilizer(compose(["stabilizer=[recommended,llrd]"]).stabilizer)


@needs_fixtures
def test_results_record_the_stabilizer_applied(tmp_path: Path) -> None:
    # tiny_config trains on 16 BIOSSES pairs: low-resource similarity -> reinit_top.
    run(tiny_config(tmp_path / "run", tmp_path / "cache", "stabilizer=recommended"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed", results.get("error")
    assert results["stabilizer"] == "reinit_top"
    assert results["stabilizer_knobs"] == {"reinit.layers": 1, "reinit.pooler": True}
    assert results["stabilizer_choice"] == (
        "recommended -> reinit_top (low-resource similarity: 16 training examples <= 1000)")
    groups = json.loads((tmp_path / "run" / "param_groups.json").read_text())["groups"]
    assert [g["group"] for g in groups if g["reinitialised"]] == ["layer.3", "pooler"]
    row = flatten(results, tmp_path / "run" / "results.json")  # the report groups by this
    assert row["stabilizer"] == "reinit_top"
    assert row["knobs"] == "reinit.layers=1, reinit.pooler=True"


@needs_fixtures
def test_dry_run_says_what_recommended_chose(tmp_path: Path, capsys) -> None:
    run(tiny_config(tmp_path / "run", tmp_path / "cache", "stabilizer=recommended",
                    "task=ncbi_disease", "model.config.model_type=electra", "dry_run=true"))
    out = capsys.readouterr().out
    assert "stabilizer: recommended -> llrd (ELECTRA)" in out
    table = json.loads((tmp_path / "run" / "param_groups.json").read_text())
    assert table["stabilizer"] == "llrd" and table["stabilizer_knobs"] == {"llrd.decay": 0.9}
    assert table["stabilizer_choice"] == "recommended -> llrd (ELECTRA)"
    lrs = {g["group"]: g["lr"] for g in table["groups"]}
    assert lrs["layer.3"] == pytest.approx(lrs["head"] * 0.9)
