"""How many members a stack can hold on this device: `hydra.sweeper.size=auto`.

On a CUDA device, one training step of a stack of 1 and of 2 members is measured on the
longest batch the task can make (`task.batch_size` rows of `task.max_length` tokens); the
difference is one member's memory, the rest is what a stack needs whatever its size, and the
device's free memory (less a margin), shared among the jobs the launcher runs at once, gives
the count. Without a CUDA device the answer is 1: on a CPU a stack trains no faster than its
members one after another (docs/benchmark.md), so the sweep runs them unstacked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("blurbtune")

MARGIN = 0.85  # the share of free memory a stack may plan to use (allocator slack, eval)


def fit_count(one: int, two: int, free: int, margin: float = MARGIN) -> int:
    """Members that fit in `free` bytes when a stack of 1 peaks at `one` and of 2 at `two`:
    memory grows by (two - one) a member over a fixed part (one - (two - one)).

    >>> fit_count(one=3_000, two=5_000, free=20_000, margin=1.0)
    9
    """
    per_member = max(two - one, 1)
    fixed = max(one - per_member, 0)
    return max(1, int((free * margin - fixed) // per_member))


def jobs_at_once(launcher: Any) -> int:
    """How many of a sweep's jobs `launcher` (the `hydra.launcher` config) runs at the same time
    on this machine: joblib's `n_jobs` (-1 one a CPU, -2 all but one...); 1 otherwise (the
    basic launcher runs them one after another, submitit gives each its own device).

    >>> jobs_at_once({"_target_": "hydra_plugins.x.JoblibLauncher", "n_jobs": 5})
    5
    """
    import os

    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return 1
    n = int(launcher.get("n_jobs") or 1)
    return max(1, n if n > 0 else (os.cpu_count() or 1) + 1 + n)


class AutoSize:
    """`size=auto` for the jobs of one sweep. The device's free memory is read once, before any
    probe, and shared by the `at_once` jobs the launcher runs together; a stack of 1 and of 2
    are measured once for each memory-relevant config (model, task, stabilizer, trainer)."""

    def __init__(self, at_once: int = 1, limit: int = 64) -> None:
        self.at_once, self.limit = max(1, int(at_once)), limit
        self.free: int | None = None  # bytes, read at the first job; 0 without a CUDA device
        self.peaks: dict[str, tuple[int, int]] = {}

    def __call__(self, load_config: Callable[[], Any]) -> int:
        import torch

        if self.free is None:
            self.free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
        if not self.free:
            return 1
        cfg = load_config()
        key = _memory_key(cfg)
        if key not in self.peaks:
            self.peaks[key] = (peak_memory(cfg, 1, "cuda"), peak_memory(cfg, 2, "cuda"))
        one, two = self.peaks[key]
        share = self.free // self.at_once
        count = min(self.limit, fit_count(one, two, share))
        log.info("stack size auto: %d members (a stack of 1 peaks at %.0f MiB, of 2 at %.0f MiB; "
                 "%.0f MiB free, shared by the %d jobs that run at once)", count, one / 2**20,
                 two / 2**20, self.free / 2**20, self.at_once)
        return count


def auto_size(load_config: Callable[[], Any], limit: int = 64) -> int:
    """`size=auto` for one job that runs alone on the device."""
    return AutoSize(1, limit)(load_config)


def _memory_key(cfg: Any) -> str:
    import json

    from omegaconf import OmegaConf

    parts = {k: OmegaConf.to_container(cfg[k], resolve=False) if k in cfg else None
             for k in ("model", "task", "stabilizer", "trainer")}
    return json.dumps(parts, sort_keys=True, default=str)


def peak_memory(cfg: Any, members: int, device: str) -> int:
    """Peak bytes allocated on `device` by one training step of a stack of `members` on the
    task's longest batch (0 where the device keeps no count, e.g. the CPU)."""
    import torch

    from blurbtune import stacking
    from blurbtune.models import load_model, load_tokenizer
    from blurbtune.stabilizer_config import apply_stabilizers, resolve

    task = cfg.task
    tokenizer = load_tokenizer(cfg.model, task)
    models = []
    for k in range(max(members, 1)):
        torch.manual_seed(k)
        model = load_model(cfg.model, task, tokenizer)
        applied = resolve(cfg.stabilizer, model, str(task.type), int(task.blurb.counts.train))
        apply_stabilizers(model, applied["sections"], float(cfg.optimizer.lr),
                          float(cfg.optimizer.weight_decay), k)
        models.append(model)
    skeleton, stacked = stacking.stack_models(models) if members > 1 else (models[0], set())
    if members > 1:
        stacking.prepare_skeleton(skeleton, max_length=int(task.max_length))
    skeleton.to(device).train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    rows, length = int(task.batch_size), int(task.max_length)
    shape = (members, rows, length) if members > 1 else (rows, length)
    inputs = {"input_ids": torch.randint(1, len(tokenizer), shape, device=device),
              "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
              "labels": _labels(skeleton, task, shape, device)}
    optimizer = torch.optim.AdamW([p for p in skeleton.parameters() if p.requires_grad])
    if members > 1:
        gens = [torch.Generator(device=device).manual_seed(k) for k in range(members)]
        loss = stacking.forward(skeleton, stacked, inputs, False, gens,
                                stacking.mask_form(skeleton)).loss.sum()
    else:
        loss = skeleton(**inputs).loss
    loss.backward()
    optimizer.step()
    if device != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated() - start
    del skeleton, models, optimizer, loss
    torch.cuda.empty_cache()
    return int(peak)


def _labels(model: Any, task: Any, shape: tuple, device: str) -> Any:
    import torch

    from blurbtune.tasks import task_type

    kind = task_type(task.type)
    labels = model.config.num_labels
    if kind.head == "token":
        return torch.randint(0, labels, shape, device=device)
    if model.config.problem_type == "regression":
        return torch.zeros(shape[:-1], device=device)
    if model.config.problem_type == "multi_label_classification":
        return torch.zeros((*shape[:-1], labels), device=device)
    return torch.randint(0, labels, shape[:-1], device=device)
