"""Several runs of one model trained as one: their weights stacked on a leading member axis.

A stack holds K members that differ only in their seeds. Each member's trainable tensors (and
any other tensor that differs between members) become one tensor of shape ``[K, ...]``,
registered in place of the original on one skeleton model; tensors equal in every member (the
frozen pretrained layers of ``freeze_lower``) stay single and are shared. ``torch.func.vmap``
over ``torch.func.functional_call`` then runs every member at once, each on its own batch (or
all on one shared evaluation batch).

What keeps a member exactly its own run:

- Dropout: under ``vmap`` torch would draw every member's masks from one generator, so a
  member's masks would depend on its stack. ``member_draws`` routes ``F.dropout`` (which
  ``nn.Dropout`` and the attention code call) to draws from each member's own generator,
  seeded as the single run seeds torch, in the order the single run draws them.
- Attention: on a GPU, PyTorch's fused kernels on every member at once, each member's
  attention dropout drawn from its own generator (``blurbtune.stack_attention``); on a CPU,
  and for a family whose attention is its own code, eager attention (``prepare_skeleton``).
- Attention masks: the 2-D padding mask goes through transformers code that branches on the
  data, which ``vmap`` refuses; the equivalent additive 4-D mask passes (``stack_mask``), and
  for a family with sliding-window layers (ModernBERT) the window's mask beside it. Only the
  encoder (the base model) is given that form; the head keeps the 2-D mask it sees in a single
  run (ModernBERT's mean pooling averages over it).
- Gradient norms, clipping and divergence are per member (``member_grad_norms``,
  ``clip_members_``); the optimizer is elementwise, so one AdamW over stacked tensors steps each
  member as its own AdamW would.

Equal, not bit-identical: batched kernels add in another order, so a member's floats agree
with its single run's to about 1e-7 per step (tested to 1e-5 in scores after training, with
identical predicted labels). Plain torch only; no Lightning, no Hydra.

>>> skeleton, stacked = stack_models([model_seed0, model_seed1])   # doctest: +SKIP
>>> out = forward(skeleton, stacked, batch, generators=gens)       # out.loss: shape [2]
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from blurbtune.errors import ConfigError

log = logging.getLogger("blurbtune")
_LOCAL = threading.local()  # the generators of the members being run (member_draws)
_DROPOUT = F.dropout


class StackError(ConfigError):
    """The runs cannot be trained as one stack; the message says why and what to do."""


@dataclass
class Stack:
    """What a stacked model needs at run time: the members' seeds (each member draws its
    dropout from a generator seeded as its single run seeds torch), which tensors are stacked,
    and the attention-mask form its family takes under `vmap`."""

    seeds: list[int]
    stacked: set[str]
    mask: str = "additive"
    pending_states: list | None = None  # generator states from a checkpoint, applied on creation
    _generators: list[torch.Generator] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.seeds)

    def generators(self, device: torch.device) -> list[torch.Generator]:
        """The members' generators on `device`, created at first use."""
        device = torch.device(device)
        if self._generators is None or self._generators[0].device != device:
            gens = [torch.Generator(device=device).manual_seed(int(s)) for s in self.seeds]
            if self.pending_states is not None:
                for gen, state in zip(gens, self.pending_states, strict=True):
                    gen.set_state(state)
                self.pending_states = None
            self._generators = gens
        return self._generators

    def generator_states(self, device: torch.device) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators(device)]


# --- dropout drawn per member -------------------------------------------------------------


class _MemberNoise(torch.autograd.Function):
    """Dropout noise (0 or 1/keep) for one tensor per member, each member's from its own
    generator, as the single run's ``F.dropout`` draws its noise on the CPU
    (``empty_like(x).bernoulli_(keep)``, then ``div_(keep)``).

    Under ``vmap`` this sees the whole ``[K, ...]`` tensor. A member whose batch was padded
    beyond its own length (to the stack's length ``L``) draws noise of the shape its single run
    has (every axis of size ``L`` cut to the member's length), in the same order, and that
    noise is laid into the padded shape (zeros on the padding). The stack's ``L`` is chosen to
    differ from every other axis size (``stack_length``), so the sequence axes are the ones of
    size ``L``.
    """

    generate_vmap_rule = False

    @staticmethod
    def forward(like: torch.Tensor, keep: float) -> torch.Tensor:
        (gen,) = _LOCAL.generators
        return torch.empty_like(like).bernoulli_(keep, generator=gen).div_(keep)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, like: torch.Tensor, keep: float) -> tuple:
        gens, lengths, padded = _LOCAL.generators, _LOCAL.lengths, _LOCAL.padded
        dim = in_dims[0]
        like = like.movedim(dim, 0) if dim is not None else like.expand(len(gens), *like.shape)
        shape = like.shape[1:]
        noise = like.new_zeros(like.shape)
        for k, gen in enumerate(gens):
            own = shape if not lengths or lengths[k] == padded else \
                torch.Size(lengths[k] if n == padded else n for n in shape)
            draw = torch.empty(own, dtype=like.dtype, device=like.device)
            draw.bernoulli_(keep, generator=gen).div_(keep)
            noise[k][tuple(slice(0, n) for n in own)] = draw
        return noise, 0


def stack_length(lengths: Sequence[int], avoid: set[int]) -> int:
    """The length to pad a stack's training batches to: the longest member's, or, where the
    members differ, the first length from there that equals none of `avoid` (the other axis
    sizes a dropped-out tensor can have: batch, hidden, heads), so that `_MemberNoise` can tell
    the sequence axes apart."""
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return longest
    while longest in avoid:
        longest += 1
    return longest


def _member_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
                    inplace: bool = False) -> torch.Tensor:
    if not training or p == 0.0 or getattr(_LOCAL, "generators", None) is None:
        return _DROPOUT(input, p, training, inplace)
    if p == 1.0:
        return input * 0.0
    return input * _MemberNoise.apply(input.detach(), 1.0 - p)


def member_context() -> tuple[list | None, list | None, int | None]:
    """The generators, own lengths and padded length `member_draws` set (None outside it)."""
    return tuple(getattr(_LOCAL, n, None) for n in ("generators", "lengths", "padded"))


@contextlib.contextmanager
def member_draws(generators: Sequence[torch.Generator] | None,
                 lengths: Sequence[int] | None = None,
                 padded: int | None = None) -> Iterator[None]:
    """Inside the block, `F.dropout` draws member k's masks from `generators[k]`, shaped as
    member k's own batch of `lengths[k]` tokens in a stack padded to `padded` (None: as
    usual). One stack per process runs at a time, so patching the function is safe."""
    previous = tuple(getattr(_LOCAL, n, None) for n in ("generators", "lengths", "padded"))
    _LOCAL.generators = list(generators) if generators is not None else None
    _LOCAL.lengths = list(lengths) if lengths is not None else None
    _LOCAL.padded = padded
    F.dropout = _member_dropout
    try:
        yield
    finally:
        _LOCAL.generators, _LOCAL.lengths, _LOCAL.padded = previous
        if previous[0] is None:
            F.dropout = _DROPOUT


# --- stacking the weights -----------------------------------------------------------------


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def stack_models(models: Sequence[nn.Module]) -> tuple[nn.Module, set[str]]:
    """One skeleton model holding the members' weights: returns (skeleton, names stacked).

    The skeleton is ``models[0]`` itself, changed in place: each parameter or buffer that is
    trainable or differs between members is replaced by the members' tensors stacked on a new
    first axis (a trainable one stays a Parameter with ``requires_grad``); the rest (equal in
    every member, frozen) stay as they are and are shared. The other models are left as they
    were; drop them to free their memory.
    """
    skeleton = models[0]
    params = [dict(m.named_parameters()) for m in models]
    buffers = [dict(m.named_buffers()) for m in models]
    names = list(params[0])
    if any(list(p) != names for p in params[1:]):
        raise StackError("the members' models have different parameters; a stack needs one "
                         "architecture")
    stacked: set[str] = set()
    for name in names:
        tensors = [p[name] for p in params]
        trainable = tensors[0].requires_grad
        if not trainable and all(torch.equal(tensors[0], t) for t in tensors[1:]):
            continue
        module, leaf = _owner(skeleton, name)
        data = torch.stack([t.detach() for t in tensors])
        module._parameters[leaf] = nn.Parameter(data, requires_grad=trainable)
        stacked.add(name)
    for name in buffers[0]:
        tensors = [b[name] for b in buffers]
        if tensors[0] is None or all(torch.equal(tensors[0], t) for t in tensors[1:]):
            continue
        module, leaf = _owner(skeleton, name)
        module._buffers[leaf] = torch.stack(tensors)
        stacked.add(name)
    return skeleton, stacked


def member_state(state: dict[str, torch.Tensor], stacked: set[str], k: int,
                 prefix: str = "") -> dict[str, torch.Tensor]:
    """Member k's part of a stacked state_dict (keys `prefix` + name): the single run's keys
    and shapes, as views into the stack."""
    return {key: (t[k] if key.removeprefix(prefix) in stacked else t)
            for key, t in state.items()}


def load_member_state_(skeleton: nn.Module, stacked: set[str], k: int,
                       state: dict[str, torch.Tensor]) -> None:
    """Copy a member's state_dict (single-run keys and shapes) into slice k of the stack."""
    with torch.no_grad():
        own = skeleton.state_dict(keep_vars=True)
        for name, value in state.items():
            if name in stacked:
                own[name][k].copy_(value)


def unstacked_copy(skeleton: nn.Module, stacked: set[str], k: int) -> nn.Module:
    """A plain model holding member k's weights (for `save_pretrained`)."""
    import copy

    model = copy.deepcopy(skeleton)
    for name in stacked:
        module, leaf = _owner(model, name)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(old.detach()[k].clone(),
                                                    requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = module._buffers[leaf][k].clone()
    return model


# --- running the members ------------------------------------------------------------------


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 2-D padding mask (1 keep, 0 pad) as the additive 4-D mask transformers' eager attention
    builds from it: 0 where a key is kept, the dtype's minimum where it is padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def sliding_additive_mask(mask: torch.Tensor, dtype: torch.dtype, window: int) -> torch.Tensor:
    """The additive ``[B, 1, L, L]`` mask transformers builds for eager attention in a
    bidirectional sliding-window layer (``create_bidirectional_sliding_window_mask``): 0 where
    a key is no padding and at most `window` positions from the query, else the dtype's
    minimum. No branch on the data, so it passes `vmap`."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    near = (positions[:, None] - positions[None, :]).abs() <= window
    keep = mask[:, None, None, :].bool() & near
    return torch.where(keep, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.finfo(dtype).min)


def stack_mask(mask: torch.Tensor, form: str, dtype: torch.dtype,
               config: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask a stack passes for the 2-D padding mask `mask`, in the family's
    `form` (`families.Family.stack_mask`): ``2d``, `mask` itself; ``additive``, the additive
    4-D mask; ``sliding``, a mask per layer type as ModernBERT takes them (the additive mask
    for full attention, `sliding_additive_mask` with the config's half window, transformers'
    ``config.sliding_window``, for local attention)."""
    if form == "2d":
        return mask
    full = additive_mask(mask, dtype)
    if form == "additive":
        return full
    return {"full_attention": full,
            "sliding_attention": sliding_additive_mask(mask, dtype, config.sliding_window)}


def forward(skeleton: nn.Module, stacked: set[str], inputs: dict[str, torch.Tensor],
            shared_inputs: bool, generators: Sequence[torch.Generator] | None = None,
            mask: str = "additive") -> Any:
    """Run every member: `inputs` hold ``[K, batch, ...]`` tensors (a batch per member) or, with
    `shared_inputs`, one ``[batch, ...]`` batch for all. Returns the model output with a leading
    member axis on each tensor (``loss``: ``[K]``). In training mode, dropout draws come from
    `generators` (one per member); any other random draw inside is an error."""
    params = dict(skeleton.named_parameters())
    buffers = dict(skeleton.named_buffers())
    param_dims = {n: (0 if n in stacked else None) for n in params}
    buffer_dims = {n: (0 if n in stacked else None) for n in buffers}
    dtype = next(iter(params.values())).dtype
    input_dims = {n: (None if shared_inputs else 0) for n in inputs}

    with_loss = "labels" in inputs

    def one(p: dict, b: dict, x: dict) -> tuple:
        out = functional_call(skeleton, (p, b), (), x)
        return (out.loss, out.logits) if with_loss else (out.logits,)

    run = vmap(one, in_dims=(param_dims, buffer_dims, input_dims), randomness="error")
    lengths = padded = None
    if skeleton.training and not shared_inputs and "attention_mask" in inputs:
        lengths = inputs["attention_mask"].sum(-1).amax(-1).tolist()
        padded = inputs["attention_mask"].shape[-1]
    with member_draws(generators if skeleton.training else None, lengths, padded), \
            _encoder_mask(skeleton, mask, dtype, "attention_mask" in inputs):
        outputs = run(params, buffers, inputs)
    return _Output(*outputs) if with_loss else _Output(None, outputs[0])


@contextlib.contextmanager
def _encoder_mask(skeleton: nn.Module, form: str, dtype: torch.dtype,
                  masked: bool) -> Iterator[None]:
    """Inside the block, the skeleton's base model (its encoder) takes the padding mask in the
    family's stacked `form` (`stack_mask`), while the task model around it keeps the 2-D mask,
    as its head may use it (ModernBERT's mean pooling). With `masked`, the base model must
    receive the mask by keyword; a call that does not is an error, not a silent unmasked run."""
    if not masked:
        yield
        return

    def to_form(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        given = kwargs.get("attention_mask")
        if given is None:
            raise StackError(f"{type(module).__name__} was called without attention_mask "
                             "by keyword; a stack cannot give it the family's mask form")
        kwargs = {**kwargs, "attention_mask": stack_mask(given, form, dtype, skeleton.config)}
        return args, kwargs

    handle = skeleton.base_model.register_forward_pre_hook(to_form, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Output:
    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor) -> None:
        self.loss, self.logits = loss, logits


def member_grad_norms(params: Sequence[torch.Tensor], members: int) -> torch.Tensor:
    """Per-member L2 norm of each tensor's gradient: ``[len(params), K]`` (0 where no grad)."""
    rows = [p.grad.detach().reshape(members, -1).float().norm(dim=1) if p.grad is not None
            else torch.zeros(members, device=p.device) for p in params]
    return torch.stack(rows) if rows else torch.zeros(0, members)


def clip_members_(params: Sequence[torch.Tensor], max_norm: float, members: int,
                  algorithm: str = "norm") -> torch.Tensor:
    """Clip each member's gradients as `torch.nn.utils.clip_grad_norm_` clips a single run's
    (coefficient ``max_norm / (norm + 1e-6)``, at most 1), over that member's slices only;
    ``algorithm="value"`` clamps each element. Returns the members' total norms before
    clipping, ``[K]``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(members)
    if algorithm == "value":
        for g in grads:
            g.clamp_(-max_norm, max_norm)
        return member_grad_norms(params, members).square().sum(0).sqrt()
    total = torch.linalg.vector_norm(
        torch.stack([g.detach().reshape(members, -1).norm(dim=1) for g in grads]), dim=0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(members, *([1] * (g.dim() - 1))))
    return total


# --- what can be stacked ------------------------------------------------------------------


def axis_sizes(config: Any) -> set[int]:
    """Sizes of the axes other than the sequence that a dropped-out tensor of this model can
    have (hidden, heads, head size, intermediate...): `stack_length` pads around them."""
    names = ("hidden_size", "num_attention_heads", "intermediate_size", "embedding_size",
             "head_dim", "num_labels", "dim", "hidden_dim", "n_heads")
    sizes = {getattr(config, n, None) for n in names}
    heads = getattr(config, "num_attention_heads", None)
    if heads and getattr(config, "hidden_size", None):
        sizes.add(config.hidden_size // heads)
    return {int(s) for s in sizes if isinstance(s, int) and not isinstance(s, bool)}


def model_type(model_cfg: Any) -> str | None:
    """The `model_type` a model config builds (from the config, or the folder's config.json);
    None when it cannot be told without loading the model."""
    spec = model_cfg.get("config")
    if spec is not None and spec.get("model_type"):
        return str(spec.model_type)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model_cfg.name_or_path)).model_type
    except Exception:  # noqa: BLE001 - the run itself says what is wrong with the model
        return None


def check_stackable(cfg: Any) -> None:
    """Refuse, in one line, a stack that cannot train each member exactly as its single run:
    a model family whose attention cannot run under `vmap`, fp16 (one gradient scaler would
    skip every member's step when one member overflows), bf16 on a CPU, several devices,
    torch.compile."""
    from blurbtune.families import FAMILIES

    fallback = "run the seeds unstacked (drop hydra/sweeper=stacked, or stack=)"
    family = model_type(cfg.model)
    if family is not None and family in FAMILIES and FAMILIES[family].stack_mask is None:
        raise StackError(f"model family {family!r} cannot be stacked "
                         f"({FAMILIES[family].stack_note}); {fallback}")
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision.startswith("16"):
        raise StackError(f"trainer.precision={precision}: fp16 shares one gradient scaler "
                         "between the members, so one member's overflow would skip every "
                         f"member's step; use bf16 or fp32, or {fallback}")
    if precision.startswith("bf16") and _on_cpu(cfg.trainer):
        raise StackError(f"trainer.precision={precision} on a CPU: CPU autocast rounds a "
                         "stack's batched matmuls to bf16 otherwise than each single run's, so "
                         "members differ from their single runs far beyond rounding (issue 28: "
                         "a BIOSSES dev score 0.63 stacked, 0.44 single); use 32-true on a "
                         f"CPU, or {fallback}")
    devices = cfg.trainer.get("devices", 1)
    if (isinstance(devices, int) and devices > 1) or "ddp" in str(
            cfg.trainer.get("strategy", "")):
        raise StackError(f"trainer.devices={devices}: a stack trains on one device; {fallback}")
    if cfg.trainer.get("compile"):
        raise StackError(f"trainer.compile=true does not apply to a stack; {fallback}")


def _on_cpu(trainer: Any) -> bool:
    """Whether Lightning will train on the CPU (`accelerator` cpu, or auto without CUDA)."""
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def mask_form(model: nn.Module) -> str:
    """How the family's attention mask passes `vmap` (`families.Family.stack_mask`)."""
    from blurbtune.families import FAMILIES

    return FAMILIES[model.config.model_type].stack_mask or "additive"


# On an H200 a stack of 10 MiniLM members trained 1.27x faster with fused attention at
# 16 x 512 (and in a third of the memory) but 1.34x slower at 16 x 128, where one kernel call
# per member and layer costs more than the eager tensors it saves (docs/benchmark.md).
FUSED_FROM_LENGTH = 256


def prepare_skeleton(model: nn.Module, attention: str = "auto",
                     max_length: int | None = None) -> str:
    """Set the skeleton's attention for `vmap`; returns the one set. ``auto``: fused where
    the stack runs on a GPU on sequences of `FUSED_FROM_LENGTH` tokens or more (the task's
    `max_length`; a fact of the configuration, so every member of every stack of it takes the
    same path), eager on a CPU and on shorter tasks; ``fused``: fused on every device;
    ``eager``: eager. Fused (`blurbtune.stack_attention`): PyTorch's scaled_dot_product_attention on
    every member at once, dropout drawn per member. Eager: transformers' eager attention under
    `vmap`, ``[K, B, H, L, L]`` tensors, its dropout through `F.dropout` (drawn per member);
    also where the family's attention is not transformers' attention interface
    (`families.Family.fused_attention`), which one log line names."""
    from blurbtune.families import FAMILIES

    if attention == "auto" and max_length is not None and max_length < FUSED_FROM_LENGTH:
        attention = "eager"
    family = FAMILIES.get(model.config.model_type)
    if attention != "eager" and family is not None and family.fused_attention:
        from blurbtune import stack_attention

        stack_attention.use(model, everywhere=attention == "fused")
        return attention
    if attention != "eager":
        why = family.attention_note if family is not None else "not in blurbtune.families"
        log.info("stacked attention: model family %r runs eager attention under vmap (%s)",
                 model.config.model_type, why)
    model.set_attn_implementation("eager")
    return "eager"
