"""Gradient diagnostics of a fine-tuning run: per-part gradient norms before clipping.

Mosbach et al. (ICLR 2021) trace failed fine-tuning runs to vanishing gradients in the lower
layers early in training. Recording the L2 norm of the gradient of each part (embeddings, each
encoder layer, pooler, task head) on every optimizer step, before clipping, makes that visible
per run: `GradientStats` keeps running sums on the gradients' device (no host sync per step)
and summarises them over the early steps (the warm-up) and over the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from blurbtune.stabilizers import param_parts

TOTAL = "total"


def part_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters of `model` by part, bottom to top: embeddings, layer.<i>, pooler,
    head (parts with nothing trainable, such as frozen layers, are left out).

    Example::

        parts = part_params(model)  # {"embeddings": [...], "layer.0": [...], ..., "head": [...]}
    """
    grouped: dict[str, list[nn.Parameter]] = {}
    params = dict(model.named_parameters())
    for name, part in param_parts(model).items():
        if params[name].requires_grad:
            grouped.setdefault(part, []).append(params[name])
    return grouped


def grad_norms(parts: dict[str, Sequence[nn.Parameter]]) -> torch.Tensor:
    """L2 norms of the current gradients: one per part in `parts`' order, then the total norm
    (over every part, as gradient clipping computes it). A part without gradients gets 0.

    One fused norm over every gradient (as `clip_grad_norm_` computes it), then a sum of
    squares per part: no host sync, a handful of kernels whatever the number of tensors.
    """
    grads: list[torch.Tensor] = []
    counts: list[int] = []
    for params in parts.values():
        found = [p.grad.detach() for p in params if p.grad is not None]
        grads.extend(found)
        counts.append(len(found))
    if not grads:
        return torch.zeros(len(counts) + 1)
    squares = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square()
    per_part = torch.stack([chunk.sum() for chunk in squares.split(counts)]).sqrt()
    return torch.cat([per_part, squares.sum().sqrt().reshape(1)])


def member_part_norms(parts: dict[str, Sequence[nn.Parameter]], members: int) -> torch.Tensor:
    """`grad_norms` for each member of a stack: ``[len(parts) + 1, members]``."""
    from blurbtune.stacking import member_grad_norms

    squares = torch.stack([member_grad_norms(params, members).square().sum(0)
                           for params in parts.values()])
    return torch.cat([squares.sqrt(), squares.sum(0, keepdim=True).sqrt()])


class GradientStats:
    """Running sums of per-part gradient norms over the early steps and the whole run, and how
    often clipping acted (total norm above `clip_threshold`).

    `update` is called once per optimizer step with the output of `grad_norms`; `summary`
    turns the sums into plain numbers for results.json.
    """

    def __init__(self, names: Iterable[str], early_steps: int, clip_threshold: float | None):
        self.names = [*names, TOTAL]
        self.early_steps = max(1, int(early_steps))
        self.clip_threshold = clip_threshold
        self.steps = 0
        self.sums: dict[str, torch.Tensor | None] = {"early": None, "whole": None}
        self.clipped: torch.Tensor | int = 0

    def update(self, norms: torch.Tensor) -> None:
        norms = norms.detach()
        for window in ("early", "whole"):
            if window == "early" and self.steps >= self.early_steps:
                continue
            current = self.sums[window]  # from a checkpoint: in host memory
            self.sums[window] = norms.clone() if current is None \
                else current.to(norms.device) + norms
        if self.clip_threshold is not None:
            self.clipped = self.clipped + (norms[-1] > self.clip_threshold).long()
        self.steps += 1

    def summary(self) -> dict:
        """`grad_norm` (mean per part over the `early` and `whole` windows), `early_steps`,
        `steps`, `clip_fraction` (None without clipping) and `clip_threshold`."""
        means = {}
        for window, total in self.sums.items():
            counted = min(self.steps, self.early_steps) if window == "early" else self.steps
            values = (total / counted).tolist() if total is not None else []
            means[window] = {name: float(v) for name, v in zip(self.names, values, strict=False)}
        clipped = int(self.clipped)
        return {
            "grad_norm": means,
            "early_steps": min(self.steps, self.early_steps),
            "steps": self.steps,
            "clip_fraction": (clipped / self.steps if self.steps else 0.0)
            if self.clip_threshold is not None else None,
            "clip_threshold": self.clip_threshold,
        }

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sums": self.sums, "clipped": self.clipped,
                "early_steps": self.early_steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.sums = state["steps"], state["sums"]
        self.clipped, self.early_steps = state["clipped"], state["early_steps"]
