"""Attention in a stack through PyTorch's fused kernels, each member drawing its own dropout.

Under ``vmap``, transformers' eager attention materialises ``[K, B, H, L, L]`` scores,
probabilities and dropout mask in every layer. A stacked skeleton set to ``NAME`` (``use``)
instead calls the function registered under that name with transformers' attention interface;
it hands the members' query, key and value to ``_StackedAttention``, whose batching rule
takes the whole ``[K, B, H, L, D]`` tensors out of ``vmap`` and runs
``torch.nn.functional.scaled_dot_product_attention`` (SDPA) on them, on contiguous tensors:

- No dropout (evaluation, or an attention dropout of 0): the members fold into the batch axis,
  ``[K * B, H, L, D]``, one kernel call for the whole stack.
- Attention dropout ``p > 0`` in training: one call per member, on the member's own length
  (the padding to the stack's length cut off, and put back as zeros after), with the device's
  default generator holding the member's generator state for the call and the state the call
  leaves written back to the member's generator. SDPA draws its dropout from the default
  generator and takes no other, so this is how member k's attention dropout comes from
  member k's generator, in the order and shapes its single run draws them.

What that gives, by device:

- CPU: SDPA with dropout runs its math path, whose mask is ``bernoulli_`` on the CPU generator
  over the ``[B, H, l, l]`` probabilities, the draw ``F.dropout`` makes: a member draws its
  single run's masks, and its loss and gradients equal its single run's (tests to 1e-6).
- CUDA: SDPA picks the flash, memory-efficient or cuDNN kernel. The kernel takes the Philox
  seed and offset of the generator at the call (the member's), so a member's attention
  dropout depends on its seed and its own batch, never on its stack or its place in it. It is
  not bit for bit its single GPU run's: in a stack the hidden dropout is drawn with
  ``bernoulli_`` from the member's generator, where a single run's fused dropout kernel uses the
  Philox stream differently (as before this module).

Two names are registered. ``NAME`` (what a stack uses): fused where the tensors are on a GPU,
and on a CPU the family's own eager attention, exactly as before this module: on a CPU the
fused path gains little in training (0.84-0.96x eager's step: SDPA's math path with dropout
does what eager attention does, one member at a time; docs/benchmark.md), and its rounding,
though closer to the single run per step, moved one ill-conditioned exactness case (a
near-constant similarity run's Pearson r) by 1.7e-5 after two epochs, over the suite's 1e-5.
``FUSED``: fused on every device
(the tests run it on the CPU against eager attention and against the single runs).

A family whose attention does not go through transformers' attention interface (DeBERTa-v2's
disentangled attention) keeps eager attention under ``vmap`` on every device
(``families.Family.fused_attention``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "blurbtune_stacked"  # fused on a GPU, the family's eager attention on a CPU
FUSED = "blurbtune_stacked_fused"  # fused on every device


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    module = torch.get_device_module(device.type)
    return module.default_generators[device.index if device.index is not None
                                     else module.current_device()]


@contextlib.contextmanager
def drawing_from(generator: torch.Generator) -> Iterator[None]:
    """Inside the block, random draws that use the default generator of `generator`'s device
    draw from `generator` (its state is swapped in, and written back after)."""
    default = _default_generator(generator.device)
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield
        generator.set_state(default.get_state())
    finally:
        default.set_state(saved)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None, p: float, scale: float | None) -> torch.Tensor:
    """SDPA on ``[N, H, L, D]`` tensors made contiguous, a float mask in the query's dtype
    (the additive mask keeps its meaning; under autocast the query is bf16)."""
    if mask is not None and mask.is_floating_point() and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    return F.scaled_dot_product_attention(query.contiguous(), key.contiguous(),
                                          value.contiguous(), attn_mask=mask, dropout_p=p,
                                          scale=scale)


def _members(tensor: torch.Tensor | None, dim: int | None, size: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.expand(size, *tensor.shape) if dim is None else tensor.movedim(dim, 0)


def _folded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Every member in one call, the member axis folded into the batch axis."""
    members, rows = query.shape[:2]

    def fold(t: torch.Tensor) -> torch.Tensor:
        t = t.expand(members, rows, *t.shape[2:]) if t.shape[1] != rows else t
        return t.reshape(members * rows, *t.shape[2:])

    out = _sdpa(fold(query), fold(key), fold(value), None if mask is None else fold(mask),
                0.0, scale)
    return out.reshape(members, rows, *out.shape[1:])


def _each(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None, p: float, scale: float | None) -> torch.Tensor:
    """One call per member, on its own length, drawing dropout from its own generator."""
    from blurbtune.stacking import member_context

    generators, lengths, padded = member_context()
    if generators is None or len(generators) != query.shape[0]:
        raise RuntimeError("attention dropout in a stack needs the members' generators "
                           "(blurbtune.stacking.member_draws)")
    length = query.shape[-2]
    outs = []
    for k, generator in enumerate(generators):
        n = lengths[k] if lengths and padded == length == key.shape[-2] else length
        own = None
        if mask is not None:
            own = mask[k][..., :n]
            own = own[..., :n, :] if own.shape[-2] == length else own
        with drawing_from(generator):
            out = _sdpa(query[k][..., :n, :], key[k][..., :n, :], value[k][..., :n, :], own,
                        p, scale)
        outs.append(out if n == length else F.pad(out, (0, 0, 0, length - n)))
    return torch.stack(outs)


class _StackedAttention(torch.autograd.Function):
    """SDPA of every member of a stack, taken out of ``vmap`` by the batching rule (the module
    docstring says how)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None, p: float, scale: float | None) -> torch.Tensor:
        # Reached only when no input differs between the members (shared weights and inputs:
        # evaluation of frozen layers), where there is no dropout to draw.
        if p > 0.0:
            raise RuntimeError("attention dropout in a stack with no member axis")
        return _sdpa(query, key, value, mask, 0.0, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        raise RuntimeError("stacked attention is differentiated through its batching rule; "
                           "a gradient without a member axis is not expected")

    @staticmethod
    def vmap(info: Any, in_dims: tuple, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, mask: torch.Tensor | None, p: float,
             scale: float | None) -> tuple[torch.Tensor, int]:
        q, k, v, m = (_members(t, d, info.batch_size)
                      for t, d in zip((query, key, value, mask), in_dims[:4], strict=True))
        out = _folded(q, k, v, m, scale) if p == 0.0 else _each(q, k, v, m, p, scale)
        return out, 0


def fused(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: torch.Tensor | None, dropout: float = 0.0,
          scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (``[B, H, L, D]`` in, ``[B, L, H, D]`` out,
    no attention weights); the additive 4-D mask as eager attention takes it. Keyword
    arguments eager attention ignores (ModernBERT's ``sliding_window``) are ignored too."""
    out = _StackedAttention.apply(query, key, value, attention_mask, float(dropout), scaling)
    return out.transpose(1, 2).contiguous(), None


def attention(module: nn.Module, query: torch.Tensor, *args: Any,
              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`fused` on a GPU; on a CPU the eager attention of the module's own modeling file (the
    function transformers falls back to for ``eager``)."""
    if query.device.type == "cpu":
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, *args, **kwargs)
    return fused(module, query, *args, **kwargs)


def use(model: nn.Module, everywhere: bool = False) -> None:
    """Set `model` (a stack's skeleton) to stacked attention: `NAME`, or `FUSED` with
    `everywhere`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    for name, function in ((NAME, attention), (FUSED, fused)):
        AttentionInterface.register(name, function)
        # The mask is eager attention's (a stack passes a ready 4-D one, used as it is).
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    model.set_attn_implementation(FUSED if everywhere else NAME)
