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

from blurbtune import hub
from blurbtune.errors import ConfigError
from blurbtune.load_report import quiet_load, show_if_encoder
from blurbtune.paths import minilm_path, package_path  # noqa: F401  (re-exported)
from blurbtune.tasks import task_type

HEADS = {"sequence": AutoModelForSequenceClassification, "token": AutoModelForTokenClassification}


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
    except OSError as e:
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
    if model_cfg.get("name_or_path"):
        name = str(model_cfg.name_or_path)
        _check_source(name, "model.name_or_path")
        try:
            config = AutoConfig.from_pretrained(name, **head)
            with quiet_load() as report:  # the new head's missing weights are no news
                model, info = auto.from_pretrained(name, config=config, output_loading_info=True)
            show_if_encoder(report, model, info)
        except OSError as e:
            raise ConfigError(f"could not load model.name_or_path={name!r}: "
                              f"{str(e).splitlines()[0]}") from None
    else:
        spec = OmegaConf.to_container(model_cfg.config, resolve=True)
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **spec, **head)
        model = auto.from_config(config)
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


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding are call-time state that tokenising sets; they do not split text
        state = json.loads(backend.to_str())
        spec = json.dumps({k: v for k, v in state.items() if k not in ("truncation", "padding")})
    else:
        spec = repr(sorted(tokenizer.get_vocab().items()))
    spec += repr(sorted(tokenizer.special_tokens_map.items())) + type(tokenizer).__name__
    return hashlib.sha256(spec.encode()).hexdigest()[:16]
