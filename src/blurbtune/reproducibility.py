"""Seeds and determinism: one function turns everything on and says what is in force."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Seed 0 is a seed like any other."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def enable_determinism(deterministic: bool) -> dict:
    """Make torch repeatable (or not) and return the flags in force, for provenance."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return {
        "deterministic": deterministic,
        "torch.use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "torch_threads": torch.get_num_threads(),
    }


def resolve_seeds(seed: int, data_seed: int | None, init_seed: int | None) -> dict[str, int]:
    """`seed` sets all; `data_seed` (example order) and `init_seed` (head, re-init) override."""
    if seed is None:
        raise ValueError("seed must be an integer (0 is fine); got null")
    return {
        "seed": int(seed),
        "data_seed": int(seed if data_seed is None else data_seed),
        "init_seed": int(seed if init_seed is None else init_seed),
    }


def set_matmul_precision(precision: str | None) -> dict:
    """Allow TF32 (or bf16) float32 matmuls when asked ("high"/"medium"); None keeps torch's.

    The GPU preset asks for "high": TF32 on Ampere and later, a no-op on CPU.
    """
    if precision is not None:
        if precision not in ("highest", "high", "medium"):
            raise ValueError(f"trainer.matmul_precision={precision!r}; expected highest, high or "
                             "medium")
        torch.set_float32_matmul_precision(precision)
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
