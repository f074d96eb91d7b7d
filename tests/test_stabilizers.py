"""Tests for blurbtune.families and blurbtune.stabilizers on tiny, randomly initialised models.

Expected parts, learning rates and weight decays are derived here from parameter names with
regular expressions, independently of the family map under test.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    ModernBertConfig,
    PretrainedConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from blurbtune.families import FAMILIES, encoder_parts, num_layers
from blurbtune.stabilizers import (
    NO_DECAY,
    describe_param_groups,
    format_param_table,
    freeze_lower_layers,
    layerwise_param_groups,
    reinit_top_layers,
)

L = 4  # encoder layers in the tiny models
LR, WD, XI = 1e-3, 0.05, 0.8


def _common(hidden: int, layers: int) -> dict:
    return {
        "vocab_size": 100,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 64,
    }


def _deberta(hidden: int, layers: int, **extra) -> DebertaV2Config:
    # DeBERTa-v3-like: relative attention with a normalised relative-position table.
    return DebertaV2Config(
        **_common(hidden, layers),
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        position_buckets=8,
        max_relative_positions=-1,
        share_att_key=True,
        **extra,
    )


CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "bert": lambda hidden=32, layers=L: BertConfig(**_common(hidden, layers)),
    "roberta": lambda hidden=32, layers=L: RobertaConfig(**_common(hidden, layers)),
    "xlm-roberta": lambda hidden=32, layers=L: XLMRobertaConfig(**_common(hidden, layers)),
    # embedding_size != hidden_size builds ELECTRA's embeddings_project
    "electra": lambda hidden=32, layers=L: ElectraConfig(
        embedding_size=hidden // 2, **_common(hidden, layers)
    ),
    "deberta-v2": lambda hidden=32, layers=L: _deberta(hidden, layers),
    # DeBERTa-v2 xlarge style, with the convolution beside layer 0
    "deberta-v2-conv": lambda hidden=32, layers=L: _deberta(hidden, layers, conv_kernel_size=3),
    "distilbert": lambda hidden=32, layers=L: DistilBertConfig(
        vocab_size=100,
        dim=hidden,
        n_layers=layers,
        n_heads=2,
        hidden_dim=2 * hidden,
        max_position_embeddings=64,
    ),
    # Special-token ids inside the tiny vocabulary (the defaults are ModernBERT's 50k ids).
    "modernbert": lambda hidden=32, layers=L: ModernBertConfig(
        **_common(hidden, layers), pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2,
    ),
}


def make(family: str, head: str = "seq", **sizes) -> nn.Module:
    cfg = CONFIGS[family](**sizes)
    cfg.num_labels = 3
    if head == "multilabel":
        cfg.problem_type = "multi_label_classification"
    cls = {
        "base": AutoModel,
        "seq": AutoModelForSequenceClassification,
        "multilabel": AutoModelForSequenceClassification,
        "tok": AutoModelForTokenClassification,
    }[head]
    torch.manual_seed(0)
    return cls.from_config(cfg)


FAMILY_HEADS = [(f, h) for f in CONFIGS for h in ("seq", "tok")] + [
    ("bert", "multilabel"),
    ("bert", "base"),
    ("electra", "base"),
    ("deberta-v2", "base"),
]

# --- independent expectations from parameter names -------------------------------------------

LAYER_RE = re.compile(r"(?:^|\.)(?:(?:encoder|transformer)\.layer|layers)\.(\d+)\.")
EMBEDDING_RE = re.compile(
    r"^(?:embeddings|embeddings_project|encoder\.rel_embeddings|encoder\.LayerNorm|encoder\.conv)\."
)


def expected_part(model: nn.Module, name: str) -> str:
    """'embeddings', 'layer.<i>', 'pooler' or 'head' for a parameter name."""
    prefix = "" if model.base_model is model else model.base_model_prefix + "."
    modernbert = model.config.model_type == "modernbert"
    if modernbert and name.startswith("head."):
        return "pooler"  # the pretrained head.dense + head.norm before the classifier
    if not name.startswith(prefix):
        return "head"  # includes DeBERTa's top-level ContextPooler
    inner = name[len(prefix) :]
    if modernbert and inner.startswith("final_norm."):
        return f"layer.{model.config.num_hidden_layers - 1}"  # normalises the top layer's output
    if match := LAYER_RE.search(inner):
        return f"layer.{match.group(1)}"
    if EMBEDDING_RE.match(inner):
        return "embeddings"
    if inner.startswith("pooler."):
        return "pooler"
    raise AssertionError(f"test does not know where {name} belongs")


def expected_lr(part: str, lr: float, xi: float, total: int = L) -> float:
    if part in ("head", "pooler"):
        return lr
    if part == "embeddings":
        return lr * xi ** (total + 1)
    layer = int(part.split(".")[1]) + 1  # 1 = bottom .. total = top
    return lr * xi ** (total - layer + 1)


def expected_no_decay(name: str) -> bool:
    norm = re.search(r"(?:LayerNorm|layer_norm|_norm|\bnorm)\.\w+$", name)
    return name.endswith("bias") or norm is not None


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def random_batch(head: str, batch: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, length))
    labels = {
        "seq": torch.randint(0, 3, (batch,)),
        "multilabel": torch.randint(0, 2, (batch, 3)).float(),
        "tok": torch.randint(0, 3, (batch, length)),
    }[head]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# --- families ----------------------------------------------------------------------------------

POOLED = {("bert", "base"), ("bert", "seq"), ("bert", "multilabel"), ("modernbert", "seq"),
          ("modernbert", "tok")}
HEAD_PREFIXES = {
    "base": [],
    "tok": ["classifier"],
    ("deberta-v2", "seq"): ["pooler", "classifier"],
    ("deberta-v2-conv", "seq"): ["pooler", "classifier"],
    ("distilbert", "seq"): ["pre_classifier", "classifier"],
}


@pytest.mark.parametrize(("family", "head"), FAMILY_HEADS)
def test_encoder_parts_finds_every_part(family: str, head: str) -> None:
    model = make(family, head)
    parts = encoder_parts(model)
    modules = dict(model.named_modules())

    assert parts.family == model.config.model_type
    assert num_layers(model) == L == len(parts.layers)
    for i, (name, module) in enumerate(parts.layers):
        assert re.search(rf"layers?\.{i}$", name) and modules[name] is module
    for name, module in parts.embeddings:
        assert modules[name] is module
    assert (parts.pooler is not None) == ((family, head) in POOLED)
    if parts.pooler is not None:
        assert modules[parts.pooler[0]] is parts.pooler[1]
    expected_heads = HEAD_PREFIXES.get((family, head), HEAD_PREFIXES.get(head, ["classifier"]))
    assert parts.head_prefixes == expected_heads

    embedding_names = {name.rsplit(".", 1)[-1] for name, _ in parts.embeddings}
    if family == "electra":
        assert "embeddings_project" in embedding_names
    if family.startswith("deberta"):
        assert {"rel_embeddings", "LayerNorm"} <= embedding_names
        assert ("conv" in embedding_names) == (family == "deberta-v2-conv")


def test_family_map_covers_the_advertised_families() -> None:
    assert {"bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "distilbert"} <= set(
        FAMILIES
    )


def test_unknown_model_type_is_refused() -> None:
    model = AutoModel.from_config(GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"'gpt2'.*bert.*deberta-v2.*electra"):
        encoder_parts(model)
    for call in (
        lambda: freeze_lower_layers(model, 0),
        lambda: reinit_top_layers(model, 0),
        lambda: layerwise_param_groups(model, 1e-3, 0.0),
    ):
        with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
            call()


# --- layerwise learning rates ------------------------------------------------------------------


def group_of_each_param(model: nn.Module, groups: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {name: [] for name, _ in model.named_parameters()}
    by_id = {id(p): name for name, p in model.named_parameters()}
    for group in groups:
        assert len(group["params"]) == len(group["param_names"]) > 0
        for param, name in zip(group["params"], group["param_names"], strict=True):
            assert by_id[id(param)] == name
            found[name].append(group)
    return found


@pytest.mark.parametrize(("family", "head"), FAMILY_HEADS)
def test_llrd_gives_every_param_its_lr_and_decay(family: str, head: str) -> None:
    model = make(family, head)
    groups = layerwise_param_groups(model, lr=LR, weight_decay=WD, decay=XI)
    found = group_of_each_param(model, groups)
    modules = dict(model.named_modules())

    for name, _ in model.named_parameters():
        assert len(found[name]) == 1, name
        group = found[name][0]
        part = expected_part(model, name)
        assert group["lr"] == expected_lr(part, LR, XI), name
        assert group["name"].removesuffix(".no_decay") == part, name
        no_decay = expected_no_decay(name)
        assert group["weight_decay"] == (0.0 if no_decay else WD), name
        assert group["name"].endswith(".no_decay") == no_decay, name
        if isinstance(modules[name.rpartition(".")[0]], nn.LayerNorm):
            assert group["weight_decay"] == 0.0, name

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    assert len({g["name"] for g in groups}) == len(groups)
    rank = ["embeddings", *[f"layer.{i}" for i in range(L)], "pooler", "head"]
    ranks = [rank.index(g["name"].removesuffix(".no_decay")) for g in groups]
    assert ranks == sorted(ranks)  # bottom to top, then pooler, then head


def test_llrd_top_layer_and_embeddings_by_hand() -> None:
    groups = {g["name"]: g for g in layerwise_param_groups(make("bert"), 2e-5, 0.01, 0.9)}
    assert groups["layer.3"]["lr"] == pytest.approx(2e-5 * 0.9)
    assert groups["layer.0"]["lr"] == pytest.approx(2e-5 * 0.9**4)
    assert groups["embeddings"]["lr"] == pytest.approx(2e-5 * 0.9**5)
    assert groups["pooler"]["lr"] == groups["head"]["lr"] == 2e-5
    assert groups["layer.0.no_decay"]["weight_decay"] == 0.0


def test_llrd_decay_one_is_plain_fine_tuning() -> None:
    groups = layerwise_param_groups(make("roberta", "tok"), lr=3e-5, weight_decay=0.1)
    assert {g["lr"] for g in groups} == {3e-5}


def test_no_decay_rule_matches_names_and_norm_modules() -> None:
    assert NO_DECAY("electra.encoder.layer.0.output.LayerNorm.weight", None)
    assert NO_DECAY("distilbert.transformer.layer.0.sa_layer_norm.weight", None)
    assert NO_DECAY("classifier.bias", nn.Linear(2, 2))
    assert NO_DECAY("encoder.norm_after.weight", nn.LayerNorm(4))
    assert not NO_DECAY("bert.encoder.layer.0.output.dense.weight", nn.Linear(2, 2))


@pytest.mark.parametrize("decay", [0, 0.0, -0.5, 1.5])
def test_llrd_rejects_decay_outside_zero_one(decay: float) -> None:
    message = f"stabilizer.llrd.decay must be in (0, 1], got {decay}"
    with pytest.raises(ValueError, match=re.escape(message)):
        layerwise_param_groups(make("bert"), lr=1e-3, weight_decay=0.0, decay=decay)


# --- freezing ----------------------------------------------------------------------------------


def expected_frozen(model: nn.Module, k: int, embeddings: bool) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        part = expected_part(model, name)
        if (part == "embeddings" and embeddings) or (
            part.startswith("layer.") and int(part.split(".")[1]) < k
        ):
            names.add(name)
    return names


@pytest.mark.parametrize(("family", "head"), [fh for fh in FAMILY_HEADS if fh[1] != "base"])
def test_frozen_layers_do_not_move_in_training(family: str, head: str) -> None:
    model = make(family, head)
    frozen = freeze_lower_layers(model, layers=2)

    assert len(frozen) == len(set(frozen))
    assert set(frozen) == expected_frozen(model, 2, embeddings=True)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name not in frozen), name
    groups = layerwise_param_groups(model, lr=1e-2, weight_decay=0.1, decay=0.9)
    in_groups = {name for g in groups for name in g["param_names"]}
    assert in_groups.isdisjoint(frozen)
    assert in_groups | set(frozen) == {name for name, _ in model.named_parameters()}

    before = snapshot(model)
    optimizer = torch.optim.AdamW(groups)
    model.train()
    torch.manual_seed(1)
    for _ in range(3):
        loss = model(**random_batch(head)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        unchanged = torch.equal(param, before[name])
        assert unchanged == (name in frozen), name


@pytest.mark.parametrize("family", ["electra", "modernbert"])
@pytest.mark.parametrize(("k", "embeddings"), [(0, True), (0, False), (3, False), (L, True)])
def test_freeze_options(family: str, k: int, embeddings: bool) -> None:
    model = make(family, "tok")
    frozen = freeze_lower_layers(model, layers=k, embeddings=embeddings)
    assert set(frozen) == expected_frozen(model, k, embeddings)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable.isdisjoint(frozen)


@pytest.mark.parametrize("k", [-1, L + 1])
def test_freeze_rejects_layer_count_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=rf"stabilizer\.freeze\.layers .* 0 and {L} .*got {k}"):
        freeze_lower_layers(make("bert"), layers=k)


# --- re-initialisation -------------------------------------------------------------------------


def perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every tensor off its init value, as a pretrained checkpoint would be."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.5)


def expected_reinit(model: nn.Module, k: int, pooler: bool) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        part = expected_part(model, name)
        if (part.startswith("layer.") and int(part.split(".")[1]) >= L - k) or (
            part == "pooler" and pooler
        ):
            names.add(name)
    return names


@pytest.mark.parametrize(("family", "head"), FAMILY_HEADS)
@pytest.mark.parametrize("pooler", [True, False])
def test_reinit_changes_exactly_the_top_layers(family: str, head: str, pooler: bool) -> None:
    model = make(family, head)
    perturb(model)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    names = reinit_top_layers(model, layers=2, pooler=pooler, generator=gen)

    assert len(names) == len(set(names))
    assert set(names) == expected_reinit(model, 2, pooler)
    if (family, head) in POOLED and pooler:
        assert any(expected_part(model, n) == "pooler" for n in names)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name not in names), name

    modules = dict(model.named_modules())
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module, param = modules[module_name], model.get_parameter(name)
        if isinstance(module, nn.LayerNorm):
            expected = torch.ones_like(param) if leaf == "weight" else torch.zeros_like(param)
            assert torch.equal(param, expected), name
        elif leaf == "bias":
            assert torch.equal(param, torch.zeros_like(param)), name


def test_reinit_zero_layers_without_pooler_is_a_no_op() -> None:
    model = make("bert")
    before = snapshot(model)
    assert reinit_top_layers(model, layers=0, pooler=False) == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_reinit_std_follows_initializer_range() -> None:
    cfg = CONFIGS["bert"](hidden=256, layers=2)
    cfg.initializer_range = 0.037
    model = AutoModelForSequenceClassification.from_config(cfg)
    perturb(model)
    names = reinit_top_layers(model, layers=1, generator=torch.Generator().manual_seed(3))
    modules = dict(model.named_modules())
    linear_weights = [
        n for n in names if isinstance(modules[n.rpartition(".")[0]], nn.Linear) and "weight" in n
    ]
    assert len(linear_weights) == 7  # q, k, v, attention output, intermediate, output, pooler
    for name in linear_weights:
        weight = model.get_parameter(name)
        assert weight.numel() >= 256 * 256
        assert weight.std().item() == pytest.approx(0.037, rel=0.03), name
        assert abs(weight.mean().item()) < 0.037 * 0.03, name


@pytest.mark.parametrize("family", ["deberta-v2", "modernbert"])
def test_reinit_is_reproducible_from_the_generator_seed(family: str) -> None:
    base = make(family, "seq")
    perturb(base)
    runs = {}
    for label, seed in (("a", 11), ("b", 11), ("c", 12)):
        model = copy.deepcopy(base)
        reinit_top_layers(model, layers=1, generator=torch.Generator().manual_seed(seed))
        runs[label] = snapshot(model)
    assert all(torch.equal(runs["a"][n], runs["b"][n]) for n in runs["a"])
    top_weights = [n for n in runs["a"] if re.search(r"layers?\.3\..*(dense|W\w+)\.weight$", n)]
    assert top_weights
    assert all(not torch.equal(runs["a"][n], runs["c"][n]) for n in top_weights)


def test_modernbert_reinit_draws_from_its_own_truncated_normal() -> None:
    """ModernBERT's init: N(0, r) for Wqkv and Wi, N(0, r / sqrt(2 L)) for the Wo projections and
    the head's dense, each cut at ±cutoff std. The sample std of each re-initialised weight is
    compared with the truncated normal's std from scipy, within 5 standard errors of the sample
    std for its size (from the distribution's fourth moment)."""
    from scipy.stats import truncnorm

    cfg = CONFIGS["modernbert"](hidden=128, layers=4)
    cfg.initializer_range, cfg.initializer_cutoff_factor, cfg.num_labels = 0.05, 2.0, 3
    model = AutoModelForSequenceClassification.from_config(cfg)
    perturb(model)
    names = reinit_top_layers(model, layers=1, generator=torch.Generator().manual_seed(5))
    weights = {n for n in names if n.endswith(".weight") and "norm" not in n}
    assert weights == {f"model.layers.3.{m}.weight" for m in ("attn.Wqkv", "attn.Wo", "mlp.Wi",
                                                               "mlp.Wo")} | {"head.dense.weight"}
    for name in weights:
        stated = 0.05 / (8**0.5 if name.endswith(("Wo.weight", "dense.weight")) else 1.0)
        dist = truncnorm(-2.0, 2.0, scale=stated)
        values = model.get_parameter(name).detach().double().flatten()
        n = values.numel()
        sd = dist.std()
        se = ((dist.moment(4) - sd**4) / (4 * sd**2 * n)) ** 0.5
        assert abs(values.std().item() - sd) < 5 * se, (name, values.std().item(), sd, se)
        assert values.abs().max().item() <= 2.0 * stated * (1 + 1e-6), name
        # an untruncated normal of this std would put ~4.6% of values beyond 2 std
        assert abs(values.mean().item()) < 5 * sd / n**0.5, name
    for name in set(names) - weights:
        assert torch.equal(model.get_parameter(name), torch.ones_like(model.get_parameter(name)))
    assert {n for n in names if n not in weights} == {
        "model.layers.3.attn_norm.weight", "model.layers.3.mlp_norm.weight",
        "model.final_norm.weight", "head.norm.weight"}


def test_reinit_works_on_a_model_loaded_from_a_checkpoint(tmp_path, monkeypatch) -> None:
    # transformers 5 marks loaded tensors as initialised, and its own init then skips them.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make("bert").save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    perturb(model)
    before = snapshot(model)
    names = reinit_top_layers(model, layers=1, generator=torch.Generator().manual_seed(0))
    assert names and all(not torch.equal(model.get_parameter(n), before[n]) for n in names)


@pytest.mark.parametrize("k", [-1, L + 1])
def test_reinit_rejects_layer_count_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=rf"stabilizer\.reinit\.layers .* 0 and {L} .*got {k}"):
        reinit_top_layers(make("roberta"), layers=k)


# --- dry-run description -----------------------------------------------------------------------


def test_describe_param_groups_for_a_frozen_llrd_model() -> None:
    model = make("bert")
    perturb(model)
    reinit = reinit_top_layers(model, layers=1, generator=torch.Generator().manual_seed(0))
    frozen = freeze_lower_layers(model, layers=2)
    groups = layerwise_param_groups(model, lr=1e-4, weight_decay=0.01, decay=0.9)
    rows = describe_param_groups(model, groups, frozen=frozen, reinit=reinit)

    sizes: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = expected_part(model, name)
        sizes[part] = sizes.get(part, 0) + param.numel()
    assert [r["group"] for r in rows] == [
        "embeddings",
        "layer.0",
        "layer.1",
        "layer.2",
        "layer.3",
        "pooler",
        "head",
    ]
    assert {r["group"]: r["parameters"] for r in rows} == sizes
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in model.parameters())

    by_group = {r["group"]: r for r in rows}
    for group in ("embeddings", "layer.0", "layer.1"):
        assert by_group[group] == {
            "group": group,
            "parameters": sizes[group],
            "trainable": 0,
            "lr": None,
            "weight_decay": None,
            "frozen": True,
            "reinitialised": False,
        }
    assert by_group["layer.2"]["lr"] == pytest.approx(1e-4 * 0.9**2)
    assert by_group["layer.3"]["lr"] == pytest.approx(1e-4 * 0.9)
    assert by_group["pooler"]["lr"] == by_group["head"]["lr"] == 1e-4
    for group in ("layer.2", "layer.3", "pooler", "head"):
        assert by_group[group]["weight_decay"] == 0.01
        assert by_group[group]["frozen"] is False
        assert by_group[group]["trainable"] == sizes[group]
    assert [r["group"] for r in rows if r["reinitialised"]] == ["layer.3", "pooler"]

    table = format_param_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "parameters", "trainable", "lr", "weight_decay",
                                "frozen", "reinit"]
    assert len({len(line) for line in lines[:2]}) == 1
    assert any(line.startswith("layer.3") and "9.000e-05" in line for line in lines)
    assert lines[-1].startswith("total")


def test_describe_param_groups_without_a_pooler() -> None:
    model = make("electra", "tok")
    rows = describe_param_groups(model, layerwise_param_groups(model, 1e-4, 0.0), [], [])
    assert [r["group"] for r in rows] == ["embeddings", *[f"layer.{i}" for i in range(L)], "head"]
    assert all(r["lr"] == 1e-4 and not r["frozen"] and not r["reinitialised"] for r in rows)
