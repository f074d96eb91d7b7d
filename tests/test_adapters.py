"""LoRA and BitFit (blurbtune.adapters) as stabilizers: what trains, how they compose, export.

Counts are worked out by hand for the tiny model (conf/model/tiny.yaml: BERT, hidden 32, 4
layers, intermediate 64, 512 positions, the 6000-token tiny vocabulary; BIOSSES: one output).
Layers of adapter tensors come from the regular expressions of test_stabilizers, and the
export is checked with transformers' and peft's own loaders.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from test_stabilizers import (
    CONFIGS,
    FAMILY_HEADS,
    L,
    expected_lr,
    expected_part,
    make,
    random_batch,
)
from tiny_runs import needs_fixtures, prediction_bytes, tiny_config
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

from blurbtune.adapters import (
    adapter_params,
    add_lora,
    as_peft_model,
    bitfit,
    has_lora,
    lora_targets,
)
from blurbtune.config import compose
from blurbtune.diagnostics import grad_norms, part_params
from blurbtune.errors import ConfigError
from blurbtune.models import load_model, load_tokenizer, save_model
from blurbtune.recommend import recommend
from blurbtune.report.collect import flatten
from blurbtune.run import run
from blurbtune.stabilizer_config import REFUSED, apply_stabilizers, check_stabilizer, registry
from blurbtune.stabilizers import describe_param_groups, layerwise_param_groups, param_parts

H, INTER, VOCAB, POSITIONS, TYPES = 32, 64, 6000, 512, 2
R = 8
LORA = {"lora": {"r": R, "alpha": 16, "dropout": 0.1}}


def tiny_biosses(init_seed: int = 0) -> tuple[nn.Module, object]:
    """The tiny model of `model=tiny task=biosses` as a run builds it, and its tokenizer."""
    cfg = compose(["model=tiny", "task=biosses"])
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    torch.manual_seed(init_seed)
    return load_model(cfg.model, cfg.task, tokenizer), tokenizer


def trainable(model: nn.Module) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in model.named_parameters() if p.requires_grad}


def is_adapter(name: str) -> bool:
    return re.search(r"\.lora_[AB]\.default\.weight$", name) is not None


# --- counts, by hand ---------------------------------------------------------------------------

# One BERT layer: q, k, v, attention output (H x H + H each), 2 LayerNorms (2H each),
# intermediate (H x INTER + INTER), output (INTER x H + H).
LAYER = 4 * (H * H + H) + 2 * 2 * H + (H * INTER + INTER) + (INTER * H + H)
EMBEDDINGS = VOCAB * H + POSITIONS * H + TYPES * H + 2 * H
POOLER = H * H + H
HEAD = H * 1 + 1  # classifier: BIOSSES has one output (a similarity score)
BASE_TOTAL = EMBEDDINGS + 4 * LAYER + POOLER + HEAD


def test_the_tiny_model_is_what_the_hand_counts_assume() -> None:
    model, tokenizer = tiny_biosses()
    assert len(tokenizer) == VOCAB and LAYER == 8544
    assert sum(p.numel() for p in model.parameters()) == BASE_TOTAL


def test_lora_trains_the_adapters_and_the_head_counted_by_hand() -> None:
    model, _ = tiny_biosses()
    groups, frozen, reinit = apply_stabilizers(model, LORA, 1e-4, 0.01, init_seed=0)
    # Each adapted Linear(32, 32) gains A (r x in) and B (out x r): r * (in + out) = 8 * 64;
    # 2 modules (query, value) in each of 4 layers; plus the head.
    per_module = R * (H + H)
    assert per_module == 512
    expected = 2 * 4 * per_module + HEAD
    assert expected == 4129
    shapes = trainable(model)
    assert sum(s.numel() for s in shapes.values()) == expected
    assert sum(p.numel() for g in groups for p in g["params"]) == expected
    assert sum(p.numel() for p in model.parameters()) == BASE_TOTAL + 2 * 4 * per_module
    adapters = {n: s for n, s in shapes.items() if is_adapter(n)}
    assert len(adapters) == 2 * 2 * 4
    for name, shape in adapters.items():
        assert re.search(r"encoder\.layer\.\d\.attention\.self\.(query|value)\.", name), name
        assert shape == ((R, H) if ".lora_A." in name else (H, R)), name
    assert {n: s for n, s in shapes.items() if not is_adapter(n)} == {
        "classifier.weight": (1, H), "classifier.bias": (1,)}
    assert set(frozen) == {n for n, _ in model.named_parameters()} - set(shapes)
    assert "bert.pooler.dense.weight" in frozen and reinit == []


def test_bitfit_trains_every_bias_and_the_head_listed_by_hand() -> None:
    model, _ = tiny_biosses()
    groups, frozen, _ = apply_stabilizers(model, {"bitfit": {}}, 1e-4, 0.01, init_seed=0)
    expected = {"bert.embeddings.LayerNorm.bias": (H,), "bert.pooler.dense.bias": (H,),
                "classifier.weight": (1, H), "classifier.bias": (1,)}
    for i in range(4):
        layer = f"bert.encoder.layer.{i}"
        expected |= {
            f"{layer}.attention.self.query.bias": (H,),
            f"{layer}.attention.self.key.bias": (H,),
            f"{layer}.attention.self.value.bias": (H,),
            f"{layer}.attention.output.dense.bias": (H,),
            f"{layer}.attention.output.LayerNorm.bias": (H,),
            f"{layer}.intermediate.dense.bias": (INTER,),
            f"{layer}.output.dense.bias": (H,),
            f"{layer}.output.LayerNorm.bias": (H,),
        }
    assert trainable(model) == {k: torch.Size(v) for k, v in expected.items()}
    # 32 (embeddings LayerNorm) + 4 x (7 x 32 + 64) + 32 (pooler) + 33 (head)
    assert sum(p.numel() for g in groups for p in g["params"]) == 32 + 4 * 288 + 32 + 33 == 1249
    assert len(frozen) == len(list(model.parameters())) - len(expected)


def test_bitfit_refuses_an_encoder_without_biases() -> None:
    with pytest.raises(ValueError, match="'modernbert' model has no bias terms"):
        bitfit(make("modernbert"))


# --- families: what LoRA adapts ----------------------------------------------------------------

# The attention projections each family names (read off the transformers modelling code).
TARGETS = {"bert": {"query", "value"}, "roberta": {"query", "value"},
           "xlm-roberta": {"query", "value"}, "electra": {"query", "value"},
           "deberta-v2": {"query_proj", "value_proj"}, "distilbert": {"q_lin", "v_lin"},
           "modernbert": {"Wqkv"}}


@pytest.mark.parametrize("family", CONFIGS)
def test_each_family_targets_linear_modules_it_has(family: str) -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    model = make(family)
    modules = dict(model.named_modules())
    names = lora_targets(model)
    wanted = TARGETS[model.config.model_type]
    assert len(names) == len(wanted) * L
    for name in names:
        assert isinstance(modules[name], nn.Linear), name
        assert name.rpartition(".")[2] in wanted
        assert expected_part(model, f"{name}.weight").startswith("layer."), name
    if model.config.model_type in PEFT:  # peft's own defaults, where it has them
        assert set(PEFT[model.config.model_type]) == wanted


@pytest.mark.parametrize(("family", "head"), [fh for fh in FAMILY_HEADS if fh[1] != "base"])
def test_lora_trains_only_adapters_and_head_and_places_them_by_layer(family, head) -> None:
    model = make(family, head)
    head_names = {n for n, _ in model.named_parameters() if expected_part(model, n) == "head"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = add_lora(model, seed=0)
    adapters = adapter_params(model)
    linear = {name: module for name, module in make(family, head).named_modules()}
    expected_adapters = sum(R * (linear[t].in_features + linear[t].out_features)
                            for t in lora_targets(make(family, head)))
    assert sum(p.numel() for p in adapters.values()) == expected_adapters
    assert set(trainable(model)) == set(adapters) | head_names
    parts = param_parts(model)
    for name in adapters:
        assert parts[name] == expected_part(model, name) != "head", name
    groups = layerwise_param_groups(model, lr=1e-2, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    model.train()
    torch.manual_seed(1)
    for _ in range(2):
        model(**random_batch(head)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    for name in frozen:  # the base, under its new name (query.weight -> query.base_layer.weight)
        assert torch.equal(after[name], before[name.replace(".base_layer.", ".")]), name
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in adapters.items()
               if ".lora_B." in n)  # B starts at zero and has trained


def test_modernbert_adapts_its_fused_projection() -> None:
    model = make("modernbert")
    add_lora(model, seed=0)
    adapters = adapter_params(model)
    assert len(adapters) == 2 * L
    # Wqkv: Linear(32, 3 x 32): r * (32 + 96) per layer
    assert sum(p.numel() for p in adapters.values()) == L * R * (H + 3 * H)


def test_encoder_parts_work_on_a_peft_model() -> None:
    model = get_peft_model(make("bert"), LoraConfig(r=4, target_modules=["query", "value"],
                                                    task_type="SEQ_CLS"))
    parts = param_parts(model)
    inner = model.get_base_model()
    for name, part in parts.items():
        relative = name.removeprefix("base_model.model.")
        relative = re.sub(r"\.(original_module|modules_to_save\.default)\.", ".", relative)
        assert part == expected_part(inner, relative.replace(".base_layer.", ".")), name
    groups = {g["name"] for g in layerwise_param_groups(model, 1e-3, 0.01)}
    assert groups == {f"layer.{i}" for i in range(L)} | {"head", "head.no_decay"}


# --- composition ------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", [("freeze_lower", "lora"), ("bitfit", "freeze_lower"),
                                  ("lora", "reinit_top"), ("bitfit", "reinit_top"),
                                  ("bitfit", "lora")])
def test_refused_pairs_say_so_in_one_line(pair: tuple[str, str]) -> None:
    stab = compose([f"stabilizer=[{pair[1]},{pair[0]}]"]).stabilizer
    with pytest.raises(ConfigError) as refused:
        check_stabilizer(stab)
    message = str(refused.value)
    assert message.startswith(f"stabilizer=[{pair[0]},{pair[1]}] is refused: ")
    assert "\n" not in message
    model, _ = tiny_biosses()
    with pytest.raises(ConfigError):
        apply_stabilizers(model, OmegaConf.to_container(stab), 1e-4, 0.01, init_seed=0)
    assert not has_lora(model)  # refused before anything changed the model


def test_the_refusals_name_known_stabilizers() -> None:
    sections = {s for pair in REFUSED for s in pair}
    assert sections <= set(registry())


@pytest.mark.parametrize("peft_stabilizer", ["lora", "bitfit"])
def test_llrd_gives_the_adapters_and_biases_their_layers_lr(peft_stabilizer: str) -> None:
    model, _ = tiny_biosses()
    stab = OmegaConf.to_container(compose([f"stabilizer=[llrd,{peft_stabilizer}]",
                                           "stabilizer.llrd.decay=0.8"]).stabilizer)
    groups, _, _ = apply_stabilizers(model, stab, 1e-3, 0.01, init_seed=0)
    seen = 0
    for group in groups:
        for name in group["param_names"]:
            part = expected_part(model, name)
            assert group["lr"] == pytest.approx(expected_lr(part, 1e-3, 0.8)), name
            seen += 1
    assert seen == len(trainable(model))
    layer_groups = {g["name"] for g in groups if g["name"].startswith("layer.")}
    assert {name.split(".no_decay")[0] for name in layer_groups} == {f"layer.{i}" for i in
                                                                      range(4)}


def test_recommended_never_picks_lora_or_bitfit() -> None:
    chosen = {recommend(model_type, layers, task_type, n).stabilizer
              for model_type in ("bert", "roberta", "electra", "deberta-v2", "distilbert",
                                 "modernbert")
              for layers in (4, 6, 12, 22, 24)
              for task_type in ("ner", "pico", "relation", "similarity", "doc_classification",
                                "qa")
              for n in (64, 5000)}
    assert chosen == {"reinit_top", "llrd", "freeze_lower", "none"}


@pytest.mark.parametrize(("knob", "value"), [("r", 0), ("r", 2.5), ("alpha", 0),
                                             ("dropout", 1.0), ("dropout", -0.1)])
def test_lora_knobs_out_of_range_are_config_errors(knob: str, value: float) -> None:
    model, _ = tiny_biosses()
    stab = {"lora": {**LORA["lora"], knob: value}}
    with pytest.raises(ConfigError, match=rf"stabilizer\.lora\.{knob} must be"):
        apply_stabilizers(model, stab, 1e-4, 0.01, init_seed=0)


# --- init seed ---------------------------------------------------------------------------------


def test_adapters_are_a_function_of_init_seed_alone() -> None:
    base, _ = tiny_biosses()
    models = {}
    for label, seed, noise in (("a", 3, 0), ("b", 3, 11), ("c", 4, 0)):
        model = copy.deepcopy(base)
        torch.manual_seed(noise)  # the global state differs between a and b
        state = torch.get_rng_state()
        apply_stabilizers(model, LORA, 1e-4, 0.01, init_seed=seed)
        assert torch.equal(torch.get_rng_state(), state)  # and is left as it was
        models[label] = adapter_params(model)
    a, b, c = models["a"], models["b"], models["c"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    lora_a = [n for n in a if ".lora_A." in n]
    assert all(not torch.equal(a[n], c[n]) for n in lora_a)
    assert all(torch.equal(a[n], torch.zeros_like(a[n])) for n in a if ".lora_B." in n)


def test_new_adapters_leave_the_outputs_unchanged() -> None:
    model, tokenizer = tiny_biosses()
    model.eval()
    batch = tokenizer(["aspirin inhibits platelets"], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        add_lora(model, seed=0)
        assert torch.equal(model(**batch).logits, before)


# --- diagnostics -------------------------------------------------------------------------------


def test_gradient_norms_show_the_adapters_by_layer() -> None:
    model = make("bert")
    add_lora(model, seed=0)
    parts = part_params(model)
    assert list(parts) == [f"layer.{i}" for i in range(L)] + ["head"]
    adapters = adapter_params(model)
    for i in range(L):
        names = {n for n, p in model.named_parameters() if any(p is q for q in parts[f"layer.{i}"])}
        assert names == {n for n in adapters if f"layer.{i}." in n}
    model(**random_batch("seq")).loss.backward()
    norms = grad_norms(parts)
    assert norms.shape == (L + 2,) and torch.isfinite(norms).all()


# --- export ------------------------------------------------------------------------------------


def trained_lora_model(family: str, head: str) -> tuple[nn.Module, nn.Module]:
    """(a model with LoRA trained a few steps, a copy of its base before the adapters)."""
    model = make(family, head)
    base = copy.deepcopy(model)
    add_lora(model, seed=0)
    optimizer = torch.optim.AdamW(layerwise_param_groups(model, 1e-2, 0.0))
    model.train()
    torch.manual_seed(2)
    for _ in range(3):
        model(**random_batch(head)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), base


@pytest.mark.parametrize(("family", "head"), [("bert", "seq"), ("bert", "tok"),
                                              ("deberta-v2", "seq"), ("distilbert", "seq"),
                                              ("modernbert", "seq")])
def test_export_merged_model_and_adapter_give_the_trained_logits(family, head, tmp_path) -> None:
    model, base = trained_lora_model(family, head)
    auto = AutoModelForSequenceClassification if head == "seq" else AutoModelForTokenClassification
    tokenizer = AutoTokenizer.from_pretrained(compose(["model=tiny"]).model.tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {k: v for k, v in random_batch(head).items() if k != "labels"}
    with torch.no_grad():
        trained = model(**batch).logits

    save_model(model, tokenizer, tmp_path / "model")
    assert has_lora(model) and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # unchanged

    folder = tmp_path / "model"
    assert not (folder / "adapter_config.json").exists()  # a plain transformers folder
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (folder / "adapter").iterdir()}
    merged = auto.from_pretrained(folder).eval()
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    base.save_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"),
                                       folder / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(**batch).logits, trained, rtol=0, atol=0)
    saved = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == R and saved["lora_alpha"] == 16
    assert set(saved["modules_to_save"]) >= {"classifier"}


def test_as_peft_model_is_a_copy() -> None:
    model, _ = trained_lora_model("bert", "seq")
    wrapped = as_peft_model(model)
    for name, param in adapter_params(model).items():
        copied = wrapped.get_parameter("base_model.model." + name)
        assert copied is not param and torch.equal(copied, param)


# --- runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@needs_fixtures
def test_dry_run_table_shows_adapters_training_and_the_base_frozen(tmp_path, cache, capsys):
    run(tiny_config(tmp_path, cache, "stabilizer=lora", "dry_run=true"))
    rows = {r["group"]: r for r in json.loads((tmp_path / "param_groups.json").read_text())[
        "groups"]}
    assert rows["embeddings"]["frozen"] and rows["pooler"]["frozen"]
    assert rows["embeddings"]["trainable"] == rows["pooler"]["trainable"] == 0
    for i in range(4):
        row = rows[f"layer.{i}"]
        assert (row["parameters"], row["trainable"], row["frozen"]) == (LAYER + 1024, 1024, False)
    assert rows["head"]["trainable"] == rows["head"]["parameters"] == HEAD
    lines = capsys.readouterr().out.splitlines()
    for i in range(4):
        assert any(re.match(rf"layer\.{i} +9,568 +1,024 +\d\.\d{{3}}e-\d\d +0\.01 +part$", line)
                   for line in lines), lines
    assert any(re.match(r"embeddings +208,512 +0 +- +- +yes$", line) for line in lines)
    assert any(re.match(r"total +247,873 +4,129 +\(1\.67% of the parameters train\)$", line)
               for line in lines)


@needs_fixtures
def test_a_lora_run_records_knobs_diagnostics_and_saves_both_forms(tmp_path, cache):
    run(tiny_config(tmp_path, cache, "stabilizer=lora", "save_model=true"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed", results.get("error")
    assert results["stabilizer"] == "lora"
    assert results["stabilizer_knobs"] == {"lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.1}
    assert flatten(results, tmp_path / "results.json")["knobs"] == (
        "lora.alpha=16, lora.dropout=0.1, lora.r=8")
    norms = results["diagnostics"]["grad_norm"]["whole"]
    assert set(norms) == {"layer.0", "layer.1", "layer.2", "layer.3", "head", "total"}
    assert all(norms[f"layer.{i}"] > 0 for i in range(4))
    folder = tmp_path / "model"
    scorer = pipeline("text-classification", model=str(folder), function_to_apply="none")
    merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "aspirin inhibits platelet aggregation"
    with torch.no_grad():
        logit = merged(**tokenizer(text, return_tensors="pt")).logits.item()
    assert scorer(text)[0]["score"] == pytest.approx(logit, abs=1e-6)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()


@needs_fixtures
def test_same_seed_lora_runs_are_identical_and_verify_says_so(tmp_path, cache):
    from blurbtune.verify import verify

    configs = {name: tiny_config(tmp_path / name, cache, "stabilizer=lora",
                                 "trainer.max_epochs=2") for name in ("a", "b")}
    for cfg in configs.values():
        run(cfg)
    assert prediction_bytes(tmp_path / "a") == prediction_bytes(tmp_path / "b")
    same, lines = verify(tmp_path / "a")  # from the config the run recorded in .hydra/
    assert same, lines


@needs_fixtures
def test_a_bitfit_run_trains_only_biases_and_head(tmp_path, cache):
    run(tiny_config(tmp_path, cache, "stabilizer=bitfit"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed", results.get("error")
    assert results["stabilizer"] == "bitfit" and results["stabilizer_knobs"] == {}
    rows = json.loads((tmp_path / "param_groups.json").read_text())["groups"]
    assert sum(r["trainable"] for r in rows) == 1249
    assert all(r["weight_decay"] == 0.0 for r in rows if r["group"] != "head")


def test_describe_marks_a_partly_trained_part() -> None:
    model = make("bert")
    add_lora(model, seed=0)
    rows = describe_param_groups(model, layerwise_param_groups(model, 1e-3, 0.0), [], [])
    assert [r["group"] for r in rows if r["trainable"] and r["trainable"] < r["parameters"]] == [
        f"layer.{i}" for i in range(L)]
