"""Where the embeddings, encoder layers and pooler live in each supported model family.

The stabilizers (freezing, re-initialisation, layerwise learning rates) need to know which
modules of a transformers model are the embeddings, which are the encoder layers (bottom to
top) and which is the pooler, and how the family initialises a layer it re-initialises. That
knowledge sits in one map, ``FAMILIES``, keyed by ``model.config.model_type``; adding a family
is one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Init:
    """A normal(0, ``std``) draw, truncated to [-``bound``, ``bound``] unless ``bound`` is None."""

    std: float
    bound: float | None = None


def normal_init(config: Any, module_name: str) -> Init:
    """BERT's init, shared by the BERT-derived families: every weight ~ N(0, initializer_range)."""
    return Init(float(config.initializer_range))


def modernbert_init(config: Any, module_name: str) -> Init:
    """ModernBERT's init (transformers' ``ModernBertPreTrainedModel._init_weights``): normal,
    truncated at ±``initializer_cutoff_factor`` std (3 when unset); std ``initializer_range``
    for the input projections (``Wqkv``, ``Wi``) and ``initializer_range / sqrt(2 L)`` for the
    projections that write back to the residual stream (``Wo``) and the head's ``dense``."""
    cutoff = config.initializer_cutoff_factor
    cutoff = 3.0 if cutoff is None else float(cutoff)
    std = float(config.initializer_range)
    if module_name.endswith(".Wo") or module_name == "head.dense":
        std /= math.sqrt(2.0 * config.num_hidden_layers)
    return Init(std, cutoff * std)


@dataclass(frozen=True)
class Family:
    """Module paths of one model family, relative to the base model (``model.base_model``).

    Paths that a given configuration does not build (ELECTRA's ``embeddings_project`` when
    ``embedding_size == hidden_size``, BERT's ``pooler`` under a token-classification head,
    DeBERTa's ``encoder.LayerNorm`` without ``norm_rel_ebd="layer_norm"``) are skipped.

    ``after_layers`` are modules applied to the top layer's output that count as part of the
    top layer (ModernBERT's ``final_norm``). ``head_pooler`` is a path relative to the task
    model, not the base model: a pretrained module outside the base model that sits between
    the encoder and the classifier and so plays the pooler's part (ModernBERT's ``head``).
    ``init`` gives the distribution a re-initialised module's weight is drawn from.
    ``lora_targets`` are the names (last path component) of the Linear modules inside each
    layer that ``stabilizer=lora`` adapts: the attention query and value projections (Hu et
    al. 2021), or the fused query/key/value projection where the family has one.
    ``stack_mask`` is the attention-mask form the family's base model takes (by keyword;
    the head keeps the 2-D mask) when its seeds are stacked
    (``blurbtune.stacking.stack_mask``: ``additive``, the 4-D mask; ``2d``, the padding mask
    as it is; ``sliding``, the 4-D masks of full and of sliding-window attention);
    None when it cannot be stacked, ``stack_note`` saying why. ``fused_attention``: whether
    its attention goes through transformers' attention interface, so that a stack runs it with
    fused kernels (``blurbtune.stack_attention``); where not, ``attention_note`` says why.
    """

    embeddings: tuple[str, ...]
    layers: str
    pooler: str | None = None
    after_layers: tuple[str, ...] = ()
    head_pooler: str | None = None
    init: Callable[[Any, str], Init] = field(default=normal_init)
    lora_targets: tuple[str, ...] = ("query", "value")
    stack_mask: str | None = "additive"
    stack_note: str = ""
    fused_attention: bool = True
    attention_note: str = ""


_BERT_LIKE = Family(embeddings=("embeddings",), layers="encoder.layer", pooler="pooler")

FAMILIES: dict[str, Family] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": Family(embeddings=("embeddings", "embeddings_project"), layers="encoder.layer"),
    # DeBERTa v2/v3: the relative-position table, its LayerNorm and the optional convolution
    # (conv_kernel_size > 0, which mixes the embedding output into layer 0) are embedding-level.
    # DeBERTa's ContextPooler sits outside the base model and is freshly initialised for a
    # task, so it counts as part of the head.
    "deberta-v2": Family(
        embeddings=("embeddings", "encoder.rel_embeddings", "encoder.LayerNorm", "encoder.conv"),
        layers="encoder.layer",
        # DeBERTa builds its attention mask from the 2-D one with no branch on the data.
        stack_mask="2d",
        fused_attention=False,
        attention_note="its disentangled attention is its own code, not transformers' "
                       "attention interface",
        lora_targets=("query_proj", "value_proj"),
    ),
    "distilbert": Family(embeddings=("embeddings",), layers="transformer.layer",
                         lora_targets=("q_lin", "v_lin")),
    # ModernBERT is pre-norm: each layer normalises its input, and final_norm normalises the top
    # layer's output, the part BERT's top layer does with its own output LayerNorm, so it goes
    # with the top layer. The task model's head (dense + norm) is loaded from the pretrained
    # masked-LM checkpoint and feeds the classifier, as BERT's pretrained pooler does: it is
    # the pooler here (full lr, never frozen, re-initialised with stabilizer.reinit.pooler).
    # Its attention has one fused query/key/value projection, Wqkv: LoRA adapts that. Its
    # local-attention layers see a window of keys: a stack passes their mask beside the full one.
    "modernbert": Family(
        embeddings=("embeddings",),
        layers="layers",
        after_layers=("final_norm",),
        head_pooler="head",
        init=modernbert_init,
        lora_targets=("Wqkv",),
        stack_mask="sliding",
    ),
}


@dataclass
class EncoderParts:
    """The parts of one model as ``(qualified name, module)`` pairs from ``named_modules()``."""

    family: str
    embeddings: list[tuple[str, nn.Module]]
    layers: list[tuple[str, nn.Module]]  # bottom (index 0) to top
    pooler: tuple[str, nn.Module] | None
    head_prefixes: list[str]  # name prefixes of the parameters in none of the parts above
    after_layers: list[tuple[str, nn.Module]] = field(default_factory=list)  # with the top layer

    def layer_modules(self, i: int) -> list[tuple[str, nn.Module]]:
        """The modules of layer ``i`` (0 = bottom): the layer, plus ``after_layers`` for the top."""
        top = i == len(self.layers) - 1 or i == -1
        return [self.layers[i]] + (self.after_layers if top else [])


def _family_of(model: nn.Module) -> tuple[str, Family]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; blurbtune knows the layers of: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return model_type, FAMILIES[model_type]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, found in model.named_modules() if found is module)


def _task_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The transformers model in ``model`` and its name prefix: ``("", model)``, or for a peft
    ``PeftModel`` the model it wraps (``base_model.model``). Adapters injected in place
    (blurbtune's LoRA) leave the model itself as the transformers model."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else model
    return ("", model) if inner is model else (_name_of(model, inner), inner)


def encoder_parts(model: nn.Module) -> EncoderParts:
    """Find the embeddings, encoder layers, pooler and task head of ``model``.

    Works for a bare base model (``AutoModel``) and for any ``AutoModelFor*`` head model of
    a family in ``FAMILIES``, also with LoRA adapters in it (injected in place, or wrapped in
    a peft ``PeftModel``: names then start with ``base_model.model.``): an adapter's tensors
    belong to the module it adapts, so the adapters of layer 3's query are in layer 3.
    Assumes the base model is reachable as ``model.base_model`` (transformers'
    ``base_model_prefix``) and raises ``ValueError`` for an unknown ``model_type`` or for
    base-model parameters the family map does not place, so a new architecture cannot
    silently land in the wrong learning-rate group.

    Example::

        parts = encoder_parts(model)  # a BertForSequenceClassification
        # parts.layers[-1][0] == "bert.encoder.layer.11", parts.head_prefixes == ["classifier"]
    """
    family_name, family = _family_of(model)
    task_prefix, task_model = _task_model(model)
    base = getattr(task_model, "base_model", task_model)
    base_prefix = _join(task_prefix, _name_of(task_model, base))

    def optional(path: str) -> tuple[str, nn.Module] | None:
        try:
            module = base.get_submodule(path)
        except AttributeError:
            return None
        return (_join(base_prefix, path), module) if module is not None else None

    embeddings = [found for path in family.embeddings if (found := optional(path))]
    layer_list = base.get_submodule(family.layers)
    layers_prefix = _join(base_prefix, family.layers)
    layers = [(f"{layers_prefix}.{i}", layer) for i, layer in enumerate(layer_list)]
    after_layers = [found for path in family.after_layers if (found := optional(path))]
    pooler = optional(family.pooler) if family.pooler else None
    if family.head_pooler and base is not task_model:
        try:
            pooler = (_join(task_prefix, family.head_pooler),
                      task_model.get_submodule(family.head_pooler))
        except AttributeError:
            pooler = None

    placed = [name for name, _ in embeddings + after_layers] + [layers_prefix]
    placed += [pooler[0]] if pooler else []
    head_prefixes: list[str] = []
    for name, _ in model.named_parameters():
        if any(_under(name, prefix) for prefix in placed + head_prefixes):
            continue
        inside = not task_prefix or _under(name, task_prefix)
        if base is task_model or _under(name, base_prefix) or not inside:
            raise ValueError(
                f"parameter {name!r} of a {family_name!r} model is in no embeddings/layer/pooler "
                "entry of blurbtune.families.FAMILIES; add its module there"
            )
        relative = name[len(task_prefix) + 1:] if task_prefix else name
        head_prefixes.append(_join(task_prefix, relative.split(".")[0]))
    return EncoderParts(family_name, embeddings, layers, pooler, head_prefixes, after_layers)


def num_layers(model: nn.Module) -> int:
    """Number of encoder layers of ``model`` (12 for a BERT-base), e.g. ``num_layers(model)``."""
    return len(encoder_parts(model).layers)
