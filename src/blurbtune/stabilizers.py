"""Fine-tuning stabilizers as plain functions on a transformers model.

Freezing the lower layers, re-initialising the top layers and layerwise learning-rate decay
(LLRD), as studied for biomedical encoders by Tinn et al. (2021). Each function takes a model
(and settings) and returns plain values, so it can be called from any training loop. Layers
are found through :mod:`blurbtune.families`.

Typical order: ``reinit_top_layers`` -> ``freeze_lower_layers`` -> ``layerwise_param_groups``
-> build the optimizer from the groups. The parameter-efficient ones (LoRA, BitFit), which
choose what trains, are in :mod:`blurbtune.adapters`; these functions place their adapters by
layer like any other parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from blurbtune.families import FAMILIES, EncoderParts, Init, encoder_parts


@dataclass(frozen=True)
class NoDecayRule:
    """Which parameters get no weight decay: biases and layer-norm parameters.

    A parameter matches if its lower-cased name contains one of ``name_fragments`` or it
    belongs directly to a module of one of ``module_types`` (so a norm whose name says
    nothing, as in some ELECTRA/DeBERTa variants, still matches).

    >>> NO_DECAY("bert.encoder.layer.0.output.LayerNorm.weight", None)
    True
    """

    name_fragments: tuple[str, ...] = ("bias", "layernorm", "layer_norm")
    module_types: tuple[type[nn.Module], ...] = (nn.LayerNorm,)

    def __call__(self, name: str, module: nn.Module | None) -> bool:
        lowered = name.lower()
        if any(fragment in lowered for fragment in self.name_fragments):
            return True
        return module is not None and isinstance(module, self.module_types)


NO_DECAY = NoDecayRule()

HEAD, POOLER, EMBEDDINGS = "head", "pooler", "embeddings"


def _check_layers(key: str, value: int, total: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= total:
        raise ValueError(
            f"{key} must be an integer between 0 and {total} (the model's number of encoder "
            f"layers), got {value!r}"
        )


def _prefixed_params(
    modules: Iterable[tuple[str, nn.Module]],
) -> list[tuple[str, nn.Parameter]]:
    return [
        (f"{prefix}.{name}" if prefix else name, param)
        for prefix, module in modules
        for name, param in module.named_parameters()
    ]


def _param_labels(model: nn.Module, parts: EncoderParts) -> dict[str, str]:
    """Map every parameter name of ``model`` to its part: embeddings, layer.<i>, pooler, head."""
    labels = {name: EMBEDDINGS for name, _ in _prefixed_params(parts.embeddings)}
    for i in range(len(parts.layers)):
        labels.update({name: f"layer.{i}" for name, _ in _prefixed_params(parts.layer_modules(i))})
    if parts.pooler is not None:
        labels.update({name: POOLER for name, _ in _prefixed_params([parts.pooler])})
    return {name: labels.get(name, HEAD) for name, _ in model.named_parameters()}


def _part_order(parts: EncoderParts) -> list[str]:
    return [EMBEDDINGS] + [f"layer.{i}" for i in range(len(parts.layers))] + [POOLER, HEAD]


def param_parts(model: nn.Module) -> dict[str, str]:
    """Every parameter name of ``model`` with its part, ordered bottom to top by part:
    ``embeddings``, ``layer.<i>`` (0 at the bottom), ``pooler``, ``head``.

    Example::

        param_parts(model)["bert.encoder.layer.0.output.dense.weight"]  # "layer.0"
    """
    parts = encoder_parts(model)
    labels = _param_labels(model, parts)
    rank = {label: i for i, label in enumerate(_part_order(parts))}
    return dict(sorted(labels.items(), key=lambda item: rank[item[1]]))


def freeze_lower_layers(model: nn.Module, layers: int, embeddings: bool = True) -> list[str]:
    """Set ``requires_grad=False`` on the embeddings (if ``embeddings``) and the bottom ``layers``
    encoder layers; return the frozen parameter names. A module the family places with the top
    layer (ModernBERT's ``final_norm``) is frozen only when every layer is.

    Assumes it runs before the optimizer is built (frozen tensors must be in no param group,
    which :func:`layerwise_param_groups` ensures). ``requires_grad`` is not saved in a
    checkpoint, so call it again after loading one to resume.

    Example::

        frozen = freeze_lower_layers(model, layers=6)
        # frozen[0] == "bert.embeddings.word_embeddings.weight"
    """
    parts = encoder_parts(model)
    _check_layers("stabilizer.freeze.layers", layers, len(parts.layers))
    modules = list(parts.embeddings) if embeddings else []
    for i in range(layers):
        modules += parts.layer_modules(i)
    frozen = _prefixed_params(modules)
    for _, param in frozen:
        param.requires_grad_(False)
    return [name for name, _ in frozen]


def _normal_(tensor: torch.Tensor, init: Init, generator: torch.Generator | None) -> None:
    # Draw on the generator's device in float32 so a seed gives the same values on any device.
    device = generator.device if generator is not None else tensor.device
    sample = torch.empty(tensor.shape, dtype=torch.float32, device=device)
    if init.bound is None:
        sample.normal_(0.0, init.std, generator=generator)
    else:
        nn.init.trunc_normal_(sample, 0.0, init.std, -init.bound, init.bound, generator=generator)
    tensor.copy_(sample)


def _reinit_module(module: nn.Module, init: Init, generator: torch.Generator | None) -> None:
    if isinstance(module, nn.Linear):
        _normal_(module.weight, init, generator)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        _normal_(module.weight, init, generator)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        if module.bias is not None:
            module.bias.zero_()
    else:
        raise TypeError(f"blurbtune cannot re-initialise a {type(module).__name__} module")


def reinit_top_layers(
    model: nn.Module,
    layers: int,
    pooler: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Re-initialise the top ``layers`` encoder layers (and the pooler, if the model has one and
    ``pooler``); return the re-initialised parameter names.

    Linear and Embedding weights are drawn as the family initialises them before pretraining
    (``Family.init``: normal(0, ``config.initializer_range``) for BERT, RoBERTa, ELECTRA,
    DeBERTa and DistilBERT; ModernBERT's truncated normal with a std per projection and depth),
    biases set to 0, LayerNorm weights to 1 and biases to 0. Draws come from ``generator``
    (the global RNG if None), in module order, so a seeded generator makes it reproducible.
    It writes the init itself rather than calling transformers' ``_init_weights``, which in
    transformers 5 silently skips tensors loaded from a checkpoint. It overwrites pretrained
    weights, so call it once, right after loading, never on a resumed run. Raises
    ``TypeError`` for a parameterised module type it does not know how to initialise.

    Example::

        gen = torch.Generator().manual_seed(13)
        names = reinit_top_layers(model, layers=2, generator=gen)
    """
    parts = encoder_parts(model)
    total = len(parts.layers)
    _check_layers("stabilizer.reinit.layers", layers, total)
    init_of = FAMILIES[parts.family].init
    targets = [found for i in range(total - layers, total) for found in parts.layer_modules(i)]
    if pooler and parts.pooler is not None:
        targets.append(parts.pooler)
    names: list[str] = []
    with torch.no_grad():
        for prefix, block in targets:
            for module_name, module in block.named_modules(prefix=prefix):
                own = [name for name, _ in module.named_parameters(recurse=False)]
                if own:
                    _reinit_module(module, init_of(model.config, module_name), generator)
                    names += [f"{module_name}.{name}" for name in own]
    return names


def reinit_head(model: nn.Module, generator: torch.Generator | None = None) -> list[str]:
    """Re-initialise the task head (every parameter outside the encoder and its pooler) as
    ``reinit_top_layers`` does; return the parameter names.

    For a model loaded from a folder fine-tuned on another task: the encoder is kept and the
    head starts afresh, even where its shape happens to fit (transformers would keep it).

    Example::

        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=2, ignore_mismatched_sizes=True)
        reinit_head(model, torch.Generator().manual_seed(0))
    """
    parts = encoder_parts(model)
    init_of = FAMILIES[parts.family].init
    modules = dict(model.named_modules())
    names: list[str] = []
    with torch.no_grad():
        for prefix in parts.head_prefixes:
            for module_name, module in modules[prefix].named_modules(prefix=prefix):
                own = [name for name, _ in module.named_parameters(recurse=False)]
                if own:
                    _reinit_module(module, init_of(model.config, module_name), generator)
                    names += [f"{module_name}.{name}" for name in own]
    return names


def layerwise_param_groups(
    model: nn.Module, lr: float, weight_decay: float, decay: float = 1.0
) -> list[dict]:
    """Optimizer param groups with layerwise learning-rate decay (LLRD).

    With ``L`` encoder layers (layer l = 1 bottom .. L top), base ``lr`` η and ``decay`` ξ: the
    task head and the pooler get η, layer l gets η·ξ^(L-l+1) (the top layer η·ξ) and the
    embeddings η·ξ^(L+1); ξ=1 is plain fine-tuning. Each part is split into a weight-decayed
    group and a ``.no_decay`` group (biases, layer norms: see ``NO_DECAY``). Groups are named
    ``embeddings``, ``layer.<i>`` (i from 0 at the bottom), ``pooler``, ``head``, and carry
    ``param_names``. Parameters with ``requires_grad=False`` are left out, so freeze first;
    empty groups are dropped.

    Example::

        groups = layerwise_param_groups(model, lr=2e-5, weight_decay=0.01, decay=0.9)
        optimizer = torch.optim.AdamW(groups)
    """
    if not 0 < decay <= 1:
        raise ValueError(f"stabilizer.llrd.decay must be in (0, 1], got {decay}")
    parts = encoder_parts(model)
    total = len(parts.layers)
    scale = {EMBEDDINGS: decay ** (total + 1), POOLER: 1.0, HEAD: 1.0}
    scale.update({f"layer.{i}": decay ** (total - i) for i in range(total)})
    labels = _param_labels(model, parts)
    modules = dict(model.named_modules())

    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        label = labels[name]
        no_decay = NO_DECAY(name, modules.get(name.rpartition(".")[0]))
        key = f"{label}.no_decay" if no_decay else label
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "param_names": [],
                "lr": lr * scale[label],
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    order = [key for label in _part_order(parts) for key in (label, f"{label}.no_decay")]
    return [groups[key] for key in order if key in groups]


def describe_param_groups(
    model: nn.Module, groups: Sequence[dict], frozen: Sequence[str], reinit: Sequence[str]
) -> list[dict]:
    """One row per part (embeddings, layer.0 .. layer.L-1, pooler, head) for a dry-run table.

    Each row: ``group``, ``parameters`` (number of scalars), ``trainable`` (the scalars an
    optimizer group holds: a LoRA layer's adapters, BitFit's biases, all of a part that trains
    whole, none of a frozen one), ``lr`` and ``weight_decay`` (None when no optimizer group
    holds the part's tensors, as for a frozen part), ``frozen`` (every tensor frozen) and
    ``reinitialised`` (any tensor re-initialised). Groups are matched to parts by tensor
    identity, so it also describes groups built elsewhere, provided each part has one learning
    rate (else ``ValueError``).

    Example::

        rows = describe_param_groups(model, groups, frozen=frozen, reinit=names)
        print(format_param_table(rows))
    """
    parts = encoder_parts(model)
    labels = _param_labels(model, parts)
    group_of = {id(param): group for group in groups for param in group["params"]}
    frozen_set, reinit_set = set(frozen), set(reinit)

    members: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        members.setdefault(labels[name], []).append((name, param))

    rows = []
    for label in _part_order(parts):
        if label not in members:
            continue
        params = members[label]
        used = [group_of[id(p)] for _, p in params if id(p) in group_of]
        lrs = {group["lr"] for group in used}
        if len(lrs) > 1:
            raise ValueError(f"the {label} parameters are spread over learning rates {sorted(lrs)}")
        decays = [group.get("weight_decay") for group in used]
        rows.append(
            {
                "group": label,
                "parameters": sum(p.numel() for _, p in params),
                "trainable": sum(p.numel() for _, p in params if id(p) in group_of),
                "lr": lrs.pop() if lrs else None,
                "weight_decay": max(decays) if used and None not in decays else None,
                "frozen": all(name in frozen_set or not p.requires_grad for name, p in params),
                "reinitialised": any(name in reinit_set for name, _ in params),
            }
        )
    return rows


def format_param_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table of :func:`describe_param_groups` rows, with a total line. The
    ``frozen`` column says ``yes`` for a part with every tensor frozen and ``part`` for one
    that trains only some of its tensors (a LoRA layer: adapters train, the base is frozen).

    Example::

        print(format_param_table(rows))
        # group           parameters   trainable         lr  weight_decay  frozen  reinit
        # ...
        # layer.3              8,544       8,544  1.800e-05          0.01          yes
    """

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def frozen(row: dict) -> str:
        return "yes" if row["frozen"] else "part" if row["trainable"] < row["parameters"] else ""

    header = (f"{'group':<12}{'parameters':>14}{'trainable':>12}{'lr':>11}{'weight_decay':>14}"
              "  frozen  reinit")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['group']:<12}{row['parameters']:>14,}{row['trainable']:>12,}"
            f"{number(row['lr'], '.3e'):>11}{number(row['weight_decay'], 'g'):>14}"
            f"  {frozen(row):<6}  {'yes' if row['reinitialised'] else ''}".rstrip()
        )
    trainable = sum(row["trainable"] for row in rows)
    total = sum(row["parameters"] for row in rows)
    share = f"  ({trainable / total:.2%} of the parameters train)" if total else ""
    lines.append("-" * len(header))
    lines.append(f"{'total':<12}{total:>14,}{trainable:>12,}{share}")
    return "\n".join(lines)
