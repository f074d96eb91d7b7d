"""Tokenizer and model for a task: from a hub id, a local folder, or a config built in code."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from blurbtune import adapters, hub
from blurbtune.errors import ConfigError
from blurbtune.io import writing
from blurbtune.load_report import quiet_load, show_if_encoder
from blurbtune.paths import minilm_path, package_path  # noqa: F401  (re-exported)
from blurbtune.stabilizers import reinit_head
from blurbtune.tasks import task_type

HEADS = {"sequence": AutoModelForSequenceClassification, "token": AutoModelForTokenClassification}


def attention() -> str:
    """The attention kernel for encoders that can use flash attention (ModernBERT):
    ``flash_attention_2`` on a CUDA machine with the optional `flash-attn` package installed,
    else ``sdpa`` (PyTorch's, on any device). Nothing requires flash-attn."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _special_token_ids(config: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a config built in code the tokenizer's special-token ids, for the ids the config
    uses (ModernBERT's defaults are ids in its own 50k vocabulary). A BERT-style tokenizer has
    no bos/eos: [CLS] opens and [SEP] closes a sequence."""
    fallback = {"bos": "cls", "eos": "sep"}
    for role in ("pad", "cls", "sep", "bos", "eos"):
        key = f"{role}_token_id"
        if getattr(config, key, None) is None:
            continue
        value = getattr(tokenizer, key, None)
        if value is None and role in fallback:
            value = getattr(tokenizer, f"{fallback[role]}_token_id", None)
        if value is not None:
            setattr(config, key, value)


def _check_source(name: str, key: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}={name!r} is a file; expected a model folder or a hub id")
        return
    if name.startswith(("/", ".", "~")):
        raise ConfigError(f"{key}={name!r}: no such folder (a local model folder was expected)")
    if _offline():
        if not hub.in_cache(name):
            raise ConfigError(f"{key}={name!r} is a hub id but HF_HUB_OFFLINE is set and the "
                              f"hub cache has no copy; point {key} at a local folder holding "
                              "the model")
        return
    problem = hub.unreachable()
    if problem:
        hint = ("a copy is in the hub cache: set HF_HUB_OFFLINE=1 to use it" if hub.in_cache(name)
                else f"set HF_HUB_OFFLINE=1 to use a cached copy, or point {key} at a local "
                     "folder holding the model")
        raise ConfigError(f"{key}={name!r} is a hub id and {problem}; {hint}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load_tokenizer(model_cfg: Any, task: Any) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with the task's entity markers added as single tokens."""
    name = str(model_cfg.get("tokenizer") or model_cfg.name_or_path)
    _check_source(name, "model.tokenizer" if model_cfg.get("tokenizer") else "model.name_or_path")
    try:
        tok = AutoTokenizer.from_pretrained(name, **(model_cfg.get("tokenizer_kwargs") or {}))
    except (OSError, ValueError) as e:  # ValueError: a folder whose config names no model type
        raise ConfigError(
            f"could not load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
    markers = list(task.get("markers") or [])
    if markers:
        tok.add_tokens(markers, special_tokens=True)
    return tok


def load_model(model_cfg: Any, task: Any, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The encoder with the head of the task's type (random head, drawn from torch's RNG)."""
    kind = task_type(task.type)
    labels = list(task.labels) if task.get("labels") is not None else ["score"]
    head = {
        "num_labels": kind.num_labels(task),
        "problem_type": kind.problem_type,
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    auto = HEADS[kind.head]
    attn = model_cfg.get("attn_implementation")
    kwargs = {"attn_implementation": str(attn)} if attn else {}
    if model_cfg.get("name_or_path"):
        name = str(model_cfg.name_or_path)
        _check_source(name, "model.name_or_path")
        new_head = bool(model_cfg.get("new_head", False))
        try:
            if not new_head:
                _check_saved_head(AutoConfig.from_pretrained(name), name, kind.head, labels,
                                  task.name)
            config = AutoConfig.from_pretrained(name, **head)
            _deterministic_kernel(config, attn)
            with quiet_load() as report:  # the new head's missing weights are no news
                model, info = auto.from_pretrained(
                    name, config=config, ignore_mismatched_sizes=new_head,
                    output_loading_info=True, **kwargs)
            show_if_encoder(report, model, info)
        except (OSError, ValueError) as e:  # ValueError: a config.json that names no model type
            raise ConfigError(f"could not load model.name_or_path={name!r}: "
                              f"{str(e).splitlines()[0]}") from None
        if new_head:
            reinit_head(model)  # from torch's RNG, seeded with init_seed by the caller
    else:
        spec = OmegaConf.to_container(model_cfg.config, resolve=True)
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **spec, **head)
        _special_token_ids(config, tokenizer)
        _deterministic_kernel(config, attn)
        model = auto.from_config(config, **kwargs)
    config = model.config
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None:
        usable = max_pos - (2 if config.model_type in ("roberta", "xlm-roberta") else 0)
        if int(task.max_length) > usable:
            raise ConfigError(f"task.max_length={task.max_length} exceeds the model's "
                              f"{usable} position embeddings ({model_cfg.name})")
    return model


ADAPTER_FOLDER = "adapter"  # save_model: where a LoRA model's adapter goes, inside `folder`


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """`save_model=true`: the model and tokenizer as `save_pretrained` folders, complete or
    absent: written into a temporary folder beside `folder`, then renamed onto it.

    A model with LoRA adapters (`stabilizer=lora`) is saved twice: `folder` holds a plain
    transformers model with the adapters merged into its weights (what `transformers.pipeline`
    and `AutoModelFor*.from_pretrained` load), and `folder/adapter/` the adapter alone, with
    the trained head, in peft's format (`PeftModel.from_pretrained(base, folder/"adapter")`).
    Both come from a copy: the model itself keeps its adapters unmerged."""
    import shutil
    import uuid

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with writing(folder):  # safetensors says a full disk as its own error
            if adapters.has_lora(model):
                peft_model = adapters.as_peft_model(model)
                peft_model.save_pretrained(tmp / ADAPTER_FOLDER)
                peft_model.merge_and_unload().save_pretrained(tmp)
                del peft_model
            else:
                model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compile_model(model: PreTrainedModel) -> None:
    """`trainer.compile`: torch.compile the model's forward in place (`nn.Module.compile`, so
    its state_dict keys, checkpoints and saved folders stay as they are). Shapes are compiled
    as dynamic from the first batch: every batch has its own length, and a graph per length
    would recompile all run long."""
    model.compile(dynamic=True)


def _deterministic_kernel(config: Any, attn: Any) -> None:
    """Flash attention's backward pass is deterministic only on request (ModernBERT's
    ``deterministic_flash_attn``): ask for it when the run asked for deterministic algorithms."""
    import torch

    if attn and "flash" in str(attn) and hasattr(config, "deterministic_flash_attn"):
        config.deterministic_flash_attn = torch.are_deterministic_algorithms_enabled()


def _saved_head(config: Any) -> str | None:
    """`sequence` or `token` when a model folder holds a fine-tuned classification head."""
    for arch in getattr(config, "architectures", None) or []:
        for kind, suffix in (("sequence", "ForSequenceClassification"),
                             ("token", "ForTokenClassification")):
            if arch.endswith(suffix):
                return kind
    return None


def _labels_text(labels: list[str]) -> str:
    shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
    return f"{len(labels)} label{'s' if len(labels) != 1 else ''} ({shown})"


def _check_saved_head(saved: Any, name: str, head: str, labels: list[str], task: str) -> None:
    """A head fine-tuned for other labels (or another head type) is an error, not a silent
    re-initialisation or a raw size-mismatch error from transformers."""
    saved_head = _saved_head(saved)
    if saved_head is None:  # a pretrained encoder (or a bare base model): a fresh head
        return
    saved_labels = [str(saved.id2label[i]) for i in sorted(saved.id2label)]
    labels = [str(label) for label in labels]
    if saved_head != head or saved_labels != labels:
        raise ConfigError(
            f"model.name_or_path={name!r} holds a {saved_head}-classification head for "
            f"{_labels_text(saved_labels)}; task {task} needs a {head}-classification head "
            f"for {_labels_text(labels)}; set model.new_head=true to keep the encoder and "
            "train a fresh head")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides how the tokenizer splits text and which inputs it
    returns (a BERT tokenizer gives token_type_ids unless told, as for ModernBERT, not to)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding are call-time state that tokenising sets; they do not split text
        state = json.loads(backend.to_str())
        spec = json.dumps({k: v for k, v in state.items() if k not in ("truncation", "padding")})
    else:
        spec = repr(sorted(tokenizer.get_vocab().items()))
    spec += repr(sorted(tokenizer.special_tokens_map.items())) + type(tokenizer).__name__
    spec += repr(list(tokenizer.model_input_names))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]
