"""OmegaConf resolvers used by the configs, and composing the config outside the command line."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from blurbtune.models import minilm_path, package_path


def dirname(overrides: str) -> str:
    """A folder name from Hydra's override string: readable, stable, no path separators."""
    name = re.sub(r"[/\\\s]+", "_", overrides).strip("_.")
    return name or "default"


def mixed_precision() -> str:
    """Lightning's precision for autocast on this GPU: bf16 where supported, else fp16."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() \
        else "16-mixed"


def register_resolvers() -> None:
    """Register blurbtune's resolvers once (idempotent)."""
    for name, fn in {
        "minilm_path": minilm_path,
        "package_path": package_path,
        "dirname": dirname,
        "mixed_precision": mixed_precision,
        "multiply": lambda a, b: int(a) * int(b),
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
