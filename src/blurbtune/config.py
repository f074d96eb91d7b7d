"""OmegaConf resolvers used by the configs, and composing the config outside the command line."""

from __future__ import annotations

import hashlib
import re

from omegaconf import DictConfig, OmegaConf

from blurbtune.paths import minilm_path, package_path

MAX_DIRNAME_BYTES = 200  # file systems allow 255 bytes per name; leave room for temp files


def dirname(overrides: str) -> str:
    """A folder name from Hydra's override string: readable, stable, unique, one path component.

    Path separators, quotes and whitespace become `_`; when that changed the string, or the name is
    too long for a file system, a short hash of the full override string is appended, so
    `model.name_or_path=a/b` and `model.name_or_path=a_b` still get different folders.

    >>> dirname("seed=1,stabilizer=llrd")
    'seed=1,stabilizer=llrd'
    >>> dirname("model.name_or_path=/m/bert")
    'model.name_or_path=_m_bert-75075418'
    """
    name = re.sub(r"""[/\\\s'"]+""", "_", overrides).strip("_.")
    if name == overrides and len(name.encode()) <= MAX_DIRNAME_BYTES:
        return name or "default"
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
    head = name.encode()[: MAX_DIRNAME_BYTES - 9].decode(errors="ignore")
    return f"{head}-{digest}"


def mixed_precision() -> str:
    """Lightning's precision for autocast on this GPU: bf16 where supported, else fp16."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() \
        else "16-mixed"


# Keys a run must not set on the command line, and what to set instead.
RESERVED = {
    "task.epochs": "task.epochs is the task's default number of epochs; set a run's epochs with "
                   "trainer.max_epochs=N (one way, so one run folder)",
}


def check_overrides(overrides: list[str]) -> None:
    """Refuse command-line overrides of keys that have another, documented way."""
    from blurbtune.errors import ConfigError

    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RESERVED:
            raise ConfigError(f"{override}: {RESERVED[key]}")


def _attention() -> str:
    from blurbtune.models import attention  # imports torch: only when a config asks

    return attention()


def _help_text() -> str:
    from blurbtune.help import text

    return text()


def register_resolvers() -> None:
    """Register blurbtune's resolvers once (idempotent)."""
    for name, fn in {
        "minilm_path": minilm_path,
        "attention": _attention,
        "package_path": package_path,
        "dirname": dirname,
        "mixed_precision": mixed_precision,
        "multiply": lambda a, b: int(a) * int(b),
        "blurbtune_help": _help_text,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def config_dir() -> str:
    return package_path("conf")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The composed run config, as `python train.py <overrides>` would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides or []), return_hydra_config=True)
