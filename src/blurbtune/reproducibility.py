"""Seeds and determinism: one function turns everything on and says what is in force."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import Sampler

from blurbtune.settings import MATMUL_PRECISIONS


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
        "dataloader": "per-epoch permutation from (data_seed, epoch); seeded worker_init_fn",
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
        if precision not in MATMUL_PRECISIONS:
            raise ValueError(f"trainer.matmul_precision={precision!r}; expected highest, high or "
                             "medium")
        torch.set_float32_matmul_precision(precision)
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (NumPy's SeedSequence), e.g. (data_seed, epoch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
               .astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64))


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed Python and NumPy in a worker from torch's worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class EpochPermutation(Sampler[int]):
    """Random order of `n` examples that depends only on (seed, epoch).

    Lightning calls `set_epoch` before each epoch, so a resumed run replays the order of the
    epoch it resumes in; `skip(k)` drops the first `k` indices of the next pass (the examples
    the interrupted run had already trained on).

    >>> s = EpochPermutation(4, seed=0); s.set_epoch(1); sorted(s) == [0, 1, 2, 3]
    True
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self._skip = n, int(seed), 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, k: int) -> None:
        self._skip = int(k)

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        start, self._skip = self._skip, 0
        return iter(self.order(self.epoch)[start:])

    def __len__(self) -> int:
        return self.n


def rng_snapshot() -> tuple:
    """Python, NumPy and torch (CPU and CUDA) RNG states as the libraries return them: cheap
    enough to take at every training step; `rng_state` turns one into its saved form."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def rng_state(snapshot: tuple | None = None) -> dict:
    """`snapshot` (taken now when None) as plain lists and tensors."""
    python, np_state, torch_state, cuda = snapshot if snapshot is not None else rng_snapshot()
    return {
        "python": _to_lists(python),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch_state,
        "cuda": cuda,
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple | list) else value
