"""Parameter-efficient fine-tuning as stabilizers: LoRA (through ``peft``) and BitFit.

Both decide which weights train. :func:`add_lora` adds low-rank adapters (Hu et al. 2021) to
the attention projections of every encoder layer, chosen per family from the one family map
(``Family.lora_targets`` in :mod:`blurbtune.families`), and freezes every pretrained weight.
:func:`bitfit` (Ben Zaken et al. 2022) freezes every weight except the bias terms. In both the
task head trains: every parameter outside the encoder and its pooler
(``EncoderParts.head_prefixes``: BERT's ``classifier``, DeBERTa's new ``pooler`` and
``classifier``...). A pretrained pooler (BERT's ``pooler``, ModernBERT's ``head``) is part of
the frozen base under LoRA, as in peft's own sequence-classification setup, whose
``modules_to_save`` is the classifier only; under BitFit its bias trains like every bias.

The adapters go into the model in place (``peft.inject_adapter_in_model``): the model object
stays the same, so optimizer groups, Lightning checkpoints and ``load_state_dict`` work as for
the other stabilizers, and :func:`blurbtune.families.encoder_parts` places each adapter in the
layer of the module it adapts. What that changes: the adapted modules' state_dict keys
(``query.weight`` becomes ``query.base_layer.weight``, beside ``query.lora_A.default.weight``
and ``query.lora_B.default.weight``), so a checkpoint of such a model loads only into a model
given the same adapters (to resume, call :func:`add_lora` again before loading).
:func:`as_peft_model` turns a trained model into peft's own ``PeftModel`` (a copy), to save the
adapter in peft's format and to merge it into a plain transformers model.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from blurbtune.families import FAMILIES, EncoderParts, encoder_parts

ADAPTER = "default"  # peft's adapter name


def _is_head(name: str, parts: EncoderParts) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parts.head_prefixes)


def lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of the Linear modules that LoRA adapts in ``model`` (without adapters
    yet): in each encoder layer, the modules named in ``FAMILIES[family].lora_targets``.

    Raises ``ValueError`` when a layer lacks one of them, so a family map that names a module
    a model does not have fails here rather than adapting less than it says.

    Example::

        lora_targets(model)[:2]  # a BertForSequenceClassification
        # ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    """
    parts = encoder_parts(model)
    wanted = FAMILIES[parts.family].lora_targets
    names: list[str] = []
    for prefix, layer in parts.layers:
        found = {name.rpartition(".")[2]: f"{prefix}.{name}"
                 for name, module in layer.named_modules()
                 if isinstance(module, nn.Linear) and name.rpartition(".")[2] in wanted}
        missing = [target for target in wanted if target not in found]
        if missing:
            raise ValueError(f"{prefix} of this {parts.family!r} model has no Linear module named "
                             f"{', '.join(missing)}: blurbtune.families.FAMILIES names its LoRA "
                             "targets (lora_targets)")
        names += [found[target] for target in wanted]
    return names


def _check_lora(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"stabilizer.lora.r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"stabilizer.lora.alpha must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) \
            or not 0 <= dropout < 1:
        raise ValueError(f"stabilizer.lora.dropout must be in [0, 1), got {dropout!r}")


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int | None) -> Iterator[None]:
    """Draws inside come from ``seed`` (on the CPU and the model's GPUs), and the global random
    state is as before afterwards; with ``seed=None`` they come from the global state."""
    if seed is None:
        yield
        return
    gpus = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(int(seed))
        for index in gpus:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name: those of peft's tuner layers outside the module they
    wrap (``lora_A``, ``lora_B``; not ``base_layer``). Empty for a model without adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for name, param in module.named_parameters(prefix=module_name):
                if not name.startswith(f"{module_name}.base_layer."):
                    found[name] = param
    return found


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapters (from :func:`add_lora`)."""
    return bool(adapter_params(model))


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.1,
             seed: int | None = None) -> list[str]:
    """Add LoRA adapters of rank ``r`` (scaling ``alpha / r``, ``dropout`` on their input) to
    the family's attention projections in every encoder layer (:func:`lora_targets`), in place,
    through ``peft``; freeze everything except the adapters and the task head; return the
    frozen parameter names.

    Each adapted ``Linear(in, out)`` gains ``r * (in + out)`` trainable parameters: ``lora_A``
    drawn as peft draws it (Kaiming-uniform), ``lora_B`` zero, so the model's outputs are
    unchanged until it trains. The draws come from ``seed`` (the global random state, left as it
    was, when given), so the adapters are a function of ``seed`` alone.

    Breaks: the adapted modules' state_dict keys change (see the module docstring), and
    ``reinit_top_layers`` refuses the adapted (peft) modules. Call it once, before building
    the optimizer groups.

    Example::

        frozen = add_lora(model, r=8, alpha=16, dropout=0.1, seed=13)
        groups = layerwise_param_groups(model, lr=1e-3, weight_decay=0.01)
    """
    from peft import LoraConfig, inject_adapter_in_model

    _check_lora(r, alpha, dropout)
    if has_lora(model):
        raise ValueError("this model already holds LoRA adapters")
    parts = encoder_parts(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout),
                        target_modules=lora_targets(model), bias="none")
    with seeded(model, seed):
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapters = adapter_params(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters or _is_head(name, parts))
    return [name for name, param in model.named_parameters() if not param.requires_grad]


def bitfit(model: nn.Module) -> list[str]:
    """BitFit: freeze every parameter except the bias terms (every parameter named ``bias``:
    linear layers', layer norms', the pooler's) and the task head; return the frozen names.

    Raises ``ValueError`` when the encoder has no bias at all (ModernBERT builds its layers
    without biases), where only the head would train.

    Example::

        frozen = bitfit(model)
        groups = layerwise_param_groups(model, lr=1e-3, weight_decay=0.01)
    """
    parts = encoder_parts(model)
    named = list(model.named_parameters())
    biases = {name for name, _ in named if name.rpartition(".")[2] == "bias"}
    if not any(not _is_head(name, parts) for name in biases):
        raise ValueError(f"stabilizer=bitfit: this {parts.family!r} model has no bias terms "
                         "outside its task head, so only the head would train")
    for name, param in named:
        param.requires_grad_(name in biases or _is_head(name, parts))
    return [name for name, param in named if not param.requires_grad]


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def as_peft_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (adapters from :func:`add_lora`) as peft's ``PeftModel``: the frozen
    base, the trained adapters, and the task head as peft's ``modules_to_save``. ``model`` is
    not changed (its adapters are neither merged nor moved).

    ``save_pretrained(folder)`` on it writes the adapter in peft's format (loaded back with
    ``PeftModel.from_pretrained(base, folder)``); ``merge_and_unload()`` gives the plain
    transformers model with the adapters merged into its weights.

    Example::

        peft_model = as_peft_model(model)
        peft_model.save_pretrained("out/adapter")
        peft_model.merge_and_unload().save_pretrained("out")
    """
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    trained = adapter_params(model)
    if not trained:
        raise ValueError("this model holds no LoRA adapters")
    parts = encoder_parts(model)
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.modules_to_save = list(parts.head_prefixes)
    config.task_type = _task_type(model)
    base = copy.deepcopy(model)
    del base.peft_config
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.get_base_layer())
    with seeded(base, 0), warnings.catch_warnings():
        # seeded: the fresh adapters are overwritten below, and the global state stays as it
        # was; peft asks transformers 5 for a property it deprecates (no news to a user).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        wrapped = get_peft_model(base, config, adapter_name=ADAPTER)
    prefix = "base_model.model."
    fresh = {name.removeprefix(prefix): param
             for name, param in adapter_params(wrapped).items()}
    if fresh.keys() != trained.keys():
        raise RuntimeError(f"peft built other adapters than the model holds: "
                           f"{sorted(fresh.keys() ^ trained.keys())[:4]}")
    with torch.no_grad():
        for name, param in fresh.items():
            param.copy_(trained[name])
    return wrapped
