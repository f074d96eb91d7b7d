"""LightningModule: thin glue between a `transformers` model, its optimizer groups and a metric."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from transformers import get_linear_schedule_with_warmup

from blurbtune import stacking
from blurbtune.console import epoch_label
from blurbtune.diagnostics import GradientStats, grad_norms, member_part_norms, part_params
from blurbtune.errors import DivergedError
from blurbtune.metrics import METRICS, constant_baseline
from blurbtune.tasks import Rows, task_type

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def to_metric(task: Any, values: list) -> list:
    """Gold or predictions in index form, in the form the task's metric takes (tag strings)."""
    if task.metric in ("entity_f1", "pico_f1"):
        labels = list(task.labels)
        return [[labels[t] for t in v] for v in values]
    return values


def _negative(task: Any) -> int | None:
    if task.metric != "relation_f1":
        return None
    return list(task.labels).index(str(task.negative_label))


def score(task: Any, preds: list, gold: list) -> float:
    """The task's metric (a fraction) for predictions and gold in index form."""
    kw = {"negative": _negative(task)} if task.metric == "relation_f1" else {}
    return float(METRICS[str(task.metric)](to_metric(task, gold), to_metric(task, preds), **kw))


def baseline(task: Any, train_gold: list, gold: list) -> float:
    """The score of the constant (majority / all-O / mean) predictor on `gold`."""
    return float(constant_baseline(str(task.metric), to_metric(task, train_gold),
                                   to_metric(task, gold), negative_label=_negative(task)))


def _all_ranks(raw: list[tuple]) -> list[tuple]:
    """Under DDP each process evaluated a shard (the sampler repeats a few rows to even them
    out): gather every shard and keep one row per (example, window)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return raw
    shards: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, raw)
    unique = {(r[0], r[3]): r for shard in shards for r in shard}
    return sorted(unique.values(), key=lambda r: (r[0], r[3]))


def best_weights(model: torch.nn.Module, stacked: set[str] | None = None,
                 k: int = 0) -> dict[str, torch.Tensor]:
    """The model's state (member k's, of a stack) to restore later, in host memory (never a
    second copy on the GPU), each tensor its own copy (a member's slice does not keep the
    stack's storage).

    Frozen parameters (`requires_grad=False`) cannot change during training, so on the CPU they
    are kept by reference rather than copied.
    """
    state = model.state_dict(keep_vars=True)
    if stacked is not None:
        state = stacking.member_state(state, stacked, k)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    return {name: v.detach() if id(v) in frozen and v.device.type == "cpu"
            else v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for name, v in state.items()}


class Member:
    """What one run learns and records while it trains: a single run is one member, a stack
    has one per seed. Its `state_dict` is what a single run's checkpoint keeps."""

    def __init__(self) -> None:
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_step = -1  # global step at which best_state was taken
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_dev: dict | None = None  # predictions and score of the best dev epoch
        self.history: list[dict] = []  # one entry per dev evaluation: epoch, step, score
        self.grad_stats: GradientStats | None = None
        self.grad_state: dict | None = None  # from a checkpoint, applied when training starts
        self.loss_sum: torch.Tensor | float = 0.0  # training loss since the last evaluation
        self.loss_n = 0
        self.diverged: str | None = None  # the error, once its training loss is not finite
        self.weights_at_divergence: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_step": self.best_step, "best_state": self.best_state,
                "history": self.history, "best_dev": self.best_dev,
                "grad_stats": self.grad_stats.state_dict() if self.grad_stats else None,
                "loss_since_eval": (self.loss_sum, self.loss_n)}

    def load_state_dict(self, state: dict) -> None:
        self.best_score = state.get("best_score", -math.inf)
        self.best_epoch = state.get("best_epoch", -1)
        self.best_step = state.get("best_step", -1)
        self.best_state = state.get("best_state")
        self.history = state.get("history", [])
        self.best_dev = state.get("best_dev")
        self.grad_state = state.get("grad_stats")
        self.loss_sum, self.loss_n = state.get("loss_since_eval", (0.0, 0))


class EpochMeans:
    """Each member's row-weighted mean of a value over an epoch, as `self.log(on_epoch=True)`
    reduces a single run's, without a `self.log` call for each member at each step."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def add(self, values: torch.Tensor, kept: torch.Tensor, rows: int) -> None:
        """One step's values (float32, one a member) over `rows` rows; `kept`: members counted."""
        sums = torch.where(kept, values, 0.0) * rows
        self.sums = sums if self.sums is None else self.sums + sums
        self.rows = kept * rows if self.rows is None else self.rows + kept * rows

    def pop(self) -> dict[int, torch.Tensor]:
        """{member: its mean} for the members counted this epoch; then starts again."""
        if self.sums is None:
            return {}
        means = {k: self.sums[k] / self.rows[k] for k in self.rows.nonzero().flatten().tolist()}
        self.sums = self.rows = None
        return means


def count_losses(members: list[Member], epoch_losses: EpochMeans | None,
                 losses: torch.Tensor, kept: torch.Tensor, rows: int) -> None:
    """Add a step's training losses (one a member; `kept`: the members counted, each batch
    `rows` long) to the members' records. Called once the step's backward pass is done: a stop
    during the step drops it, and then the records must not hold it."""
    if epoch_losses is not None:
        epoch_losses.add(losses.float(), kept, rows)
    for k in kept.nonzero().flatten().tolist():
        members[k].loss_sum = members[k].loss_sum + losses[k]
        members[k].loss_n += 1


class FineTuner(pl.LightningModule):
    """Fine-tunes `model`; evaluation gathers row outputs and scores whole splits.

    With `stack` (see `blurbtune.stacking`), `model` holds the weights of several runs stacked
    on a leading axis and every hook works per member: losses, divergence, gradient norms and
    clipping, dev history, best weights, test scores. Without it the model is called directly:
    a single run is a stack of one.
    """

    def __init__(self, model: torch.nn.Module, task: Any, param_groups: list[dict],
                 optimizer_factory: Callable, warmup_ratio: float,
                 examples: Callable[[str], list[dict]], test_every_epoch: bool = False,
                 stack: stacking.Stack | None = None) -> None:
        super().__init__()
        self.model, self.task = model, task
        self.kind = task_type(task.type)
        self.param_groups = param_groups
        self.optimizer_factory, self.warmup_ratio = optimizer_factory, warmup_ratio
        self.examples = examples
        self.test_every_epoch = test_every_epoch  # score test after each dev evaluation too
        self.stack = stack
        self.members = [Member() for _ in range(stack.size if stack else 1)]
        self._rows: dict[tuple[str, int], list] = {}
        self.trained_epoch = 0  # the epoch of the latest training step
        # split -> one {"preds", "score", "lost_words"} per member, of the latest evaluation
        self.outputs: dict[str, list[dict | None]] = {}
        self._parts: dict[str, list] = {}
        self._top_group: int | None = None  # optimizer group of the top encoder layer
        self._epoch_losses = EpochMeans()  # a stack's members' training losses this epoch
        self._step_losses: tuple | None = None  # (losses, members counted, rows) of the step

    # A single run's record, as attributes (a stack's are in self.members).
    @property
    def history(self) -> list[dict]:
        return self.members[0].history

    @property
    def best_state(self) -> dict[str, torch.Tensor] | None:
        return self.members[0].best_state

    @property
    def size(self) -> int:
        return len(self.members)

    def alive(self) -> list[int]:
        """The members still training (all but the diverged)."""
        return [k for k, m in enumerate(self.members) if m.diverged is None]

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        if self.stack is None:
            return self.model(**inputs)
        shared = inputs["input_ids"].dim() == 2  # an evaluation batch, the same for all
        if shared:
            inputs.pop("labels", None)
        return stacking.forward(self.model, self.stack.stacked, inputs, shared_inputs=shared,
                                generators=self.stack.generators(self.device),
                                mask=self.stack.mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.trained_epoch = self.current_epoch
        if self.stack is not None:
            return self._stack_training_step(batch)
        loss = self(batch).loss
        if not torch.isfinite(loss):
            raise DivergedError(f"training loss became {loss.item()} at {self._when()}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch["input_ids"].shape[0])
        self._step_losses = (loss.detach()[None], torch.ones(1, dtype=torch.bool), 1)
        return loss

    def _stack_training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = self(batch).loss
        finite = torch.isfinite(losses)
        if not bool(finite.all()):  # one host sync per step, as the single run's check
            for k in (~finite).nonzero().flatten().tolist():
                self._diverge(k, float(losses[k].detach()))
            if not self.alive():
                raise DivergedError("every member's training loss became non-finite "
                                    f"(at {self._when()})")
        alive = self.alive()
        rows = batch["input_ids"].shape[1]
        kept = torch.zeros_like(finite)
        kept[alive] = True
        self._step_losses = (losses.detach(), kept, rows)
        if self.trainer._logger_connector.should_update_logs:  # a self.log is ~1 ms of Python
            for k in alive:
                self.log(f"m{k}/train/loss_step", losses[k], on_step=True, on_epoch=False)
        self.log("train/loss", losses[alive].mean(), prog_bar=True, on_step=True,
                 on_epoch=False, logger=False, batch_size=rows)
        return torch.where(kept, losses, torch.zeros_like(losses)).sum()

    def _when(self) -> str:
        """`epoch 2/3, step 5`: the epoch as the progress bar counts it (from 1)."""
        epoch = epoch_label(self.current_epoch, self.trainer.max_epochs)
        return f"{epoch}, step {self.global_step}"

    def on_train_epoch_end(self) -> None:
        for k, mean in self._epoch_losses.pop().items():
            self.log(f"m{k}/train/loss_epoch", mean, on_step=False, on_epoch=True)

    def _diverge(self, k: int, loss: float) -> None:
        """Member k's loss is not finite: it stops updating and its record ends here."""
        member = self.members[k]
        if member.diverged is not None:
            return
        member.diverged = f"training loss became {loss} at {self._when()}"
        member.weights_at_divergence = {
            name: p.detach()[k].clone() for name, p in self.model.named_parameters()
            if name in self.stack.stacked and p.requires_grad}

    def on_after_backward(self) -> None:
        count_losses(self.members, self._epoch_losses if self.stack else None,
                     *self._step_losses)
        if self.stack is None or len(self.alive()) == self.size:
            return
        for k, member in enumerate(self.members):  # no NaN reaches clipping or a scaler
            if member.diverged is not None:
                for p in self.model.parameters():
                    if p.grad is not None:  # only stacked tensors train
                        p.grad[k].zero_()

    def on_train_start(self) -> None:
        self._parts = part_params(self.model)
        early = round(self.warmup_ratio * self.trainer.estimated_stepping_batches)
        for member in self.members:
            member.grad_stats = GradientStats(self._parts, early, self.trainer.gradient_clip_val)
            if member.grad_state is not None:
                member.grad_stats.load_state_dict(member.grad_state)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-part gradient norms before clipping (Lightning clips after this hook): summed
        every step, logged only on the steps Lightning writes (`log_every_n_steps`)."""
        log_now = self.trainer._logger_connector.should_update_logs
        if self.stack is None:
            norms = grad_norms(self._parts)
            self.members[0].grad_stats.update(norms)
            # The same test Lightning applies when it writes this step's metrics (after it).
            if log_now:
                self.log_dict({f"grad_norm/{name}": norms[i]
                               for i, name in enumerate(self.members[0].grad_stats.names)},
                              on_step=True, on_epoch=False)
            return
        per_member = member_part_norms(self._parts, self.size)  # [parts + 1, K]
        for k in self.alive():
            stats = self.members[k].grad_stats
            stats.update(per_member[:, k])
            if log_now:
                self.log_dict({f"m{k}/grad_norm/{name}": per_member[i, k]
                               for i, name in enumerate(stats.names)},
                              on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as `trainer.gradient_clip_val` says; a stack clips each member's gradients to
        that member's norm. Lightning's mixed-precision plugin refuses any fused optimizer,
        for fear that a gradient scaler left the gradients scaled; bf16 has no scaler, so there
        the gradients are the true ones and are clipped here, over the optimizer's parameters
        as Lightning would."""
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.stack is not None:
            stacking.clip_members_(params, float(gradient_clip_val), self.size,
                                   gradient_clip_algorithm or "norm")
            return
        plugin = self.trainer.precision_plugin
        if self._grad_scaler() is not None or not isinstance(plugin, MixedPrecision):
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable | None = None) -> None:
        """Step, then free the gradients at once: Lightning would clear them only after the
        next batch's forward pass, which then holds a whole extra copy of them. A diverged
        member's weights are put back: it stopped updating when its loss stopped being
        finite."""
        optimizer.step(closure=optimizer_closure)
        optimizer.zero_grad(set_to_none=True)
        if self.stack is None:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, member in enumerate(self.members):
                for name, value in (member.weights_at_divergence or {}).items():
                    params[name][k].copy_(value)

    def _epoch_record(self, member: Member, dev: float, epoch: int) -> dict:
        """One history row: epoch, step, dev score, mean training loss since the last
        evaluation, and the top encoder layer's current learning rate."""
        loss = float(member.loss_sum / member.loss_n) if member.loss_n else None
        member.loss_sum, member.loss_n = 0.0, 0
        lr_top = None
        if self._top_group is not None and self.trainer.optimizers:
            lr_top = float(self.trainer.optimizers[0].param_groups[self._top_group]["lr"])
        return {"epoch": epoch, "step": self.global_step, "dev": dev, "train_loss": loss,
                "lr_top": lr_top}

    def _gather(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        logits = self(batch).logits.detach().float().cpu()
        if self.stack is None:
            logits = logits[None]
        mask = batch["attention_mask"].bool().cpu()
        labels = batch["labels"].cpu()
        offsets = batch.get("word_offset")
        ids = batch["example_idx"].tolist()
        for k in self.alive():
            rows = self._rows.setdefault((split, k), [])
            for i, idx in enumerate(ids):
                if self.kind.head == "token":
                    rows.append((idx, logits[k][i][mask[i]], labels[i][mask[i]],
                                 int(offsets[i]) if offsets is not None else 0))
                else:
                    rows.append((idx, logits[k][i], labels[i], 0))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._gather("dev", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._gather("test", batch)

    def evaluate_rows(self, split: str) -> list[dict | None]:
        """Decode each member's gathered rows of `split` into predictions and score them
        (None for a member that diverged before this evaluation)."""
        examples = self.examples(split)
        gold = [ex["gold"] for ex in examples]
        outs: list[dict | None] = []
        for k in range(self.size):
            gathered = self._rows.pop((split, k), None)
            if gathered is None:
                outs.append(None)
                continue
            raw = sorted(_all_ranks(gathered), key=lambda r: (r[0], r[3]))
            rows = Rows([r[0] for r in raw], [r[1] for r in raw], [r[2] for r in raw],
                        [r[3] for r in raw])
            preds = self.kind.decode(rows, examples)
            outs.append({"preds": preds, "score": score(self.task, preds, gold),
                         "lost_words": rows.lost_words})
        self.outputs[split] = outs
        return outs

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for k in range(self.size):
                self._rows.pop(("dev", k), None)
            return
        outs = self.evaluate_rows("dev")
        # Not current_epoch: after fit (see dev_is_stale) it has moved past the last epoch.
        epoch = self.trained_epoch
        tests = self._score_test_now() if self.test_every_epoch else None
        scores = []
        for k, out in enumerate(outs):
            if out is None:
                continue
            member = self.members[k]
            record = self._epoch_record(member, out["score"], epoch)
            if tests is not None:
                record["test"] = tests[k]["score"]
            member.history.append(record)
            scores.append(out["score"])
            if out["score"] > member.best_score:
                member.best_score, member.best_epoch = out["score"], epoch
                member.best_step = self.global_step
                member.best_state = best_weights(
                    self.model, self.stack.stacked if self.stack else None, k)
                member.best_dev = out
        metric = f"dev/{self.task.metric}"
        if self.stack is None:
            self.log(metric, outs[0]["score"], prog_bar=True)
            return
        for k, out in enumerate(outs):
            if out is not None:
                self.log(f"m{k}/{metric}", out["score"], prog_bar=False)
        ordered = sorted(scores)
        for name, value in (("min", ordered[0]), ("med", ordered[len(ordered) // 2]),
                            ("max", ordered[-1])):
            self.log(f"dev {name}", value, prog_bar=True, logger=False)

    def _score_test_now(self) -> list[dict | None]:
        """The current weights' test scores, for the record only (never used to select): the
        test loader draws from its own generator, so training's random stream is untouched."""
        loader = self.trainer.datamodule.test_dataloader()
        with self.trainer.precision_plugin.test_step_context():
            for batch in loader:
                self._gather("test", self.transfer_batch_to_device(batch, self.device, 0))
        return self.evaluate_rows("test")

    def best_is_last(self, k: int = 0) -> bool:
        """Whether member k's best-on-dev weights are the model's current weights (the last
        evaluation set the best and no step came after it): then they need no second test."""
        member = self.members[k]
        return member.best_state is not None and member.best_step == self.global_step

    def load_best_weights(self) -> None:
        """Put each member's best-on-dev weights in place (a member without any: as they are)."""
        for k, member in enumerate(self.members):
            if member.best_state is None:
                continue
            if self.stack is None:
                self.model.load_state_dict(member.best_state)
            else:
                stacking.load_member_state_(self.model, self.stack.stacked, k, member.best_state)

    def dev_is_stale(self) -> bool:
        """Whether training stepped after the latest dev evaluation, or none ran: training
        ended by `max_steps`, or between `val_check_interval`s or `check_val_every_n_epoch`s.
        Then the caller evaluates dev once more, so the last model has a dev score and the
        best-on-dev model exists."""
        alive = self.alive()
        if not alive:
            return False
        history = self.members[alive[0]].history
        return not history or history[-1]["step"] < self.global_step

    def on_test_epoch_end(self) -> None:
        outs = self.evaluate_rows("test")
        if self.stack is None:
            self.log(f"test/{self.task.metric}", outs[0]["score"])
            return
        for k, out in enumerate(outs):
            if out is not None:
                self.log(f"m{k}/test/{self.task.metric}", out["score"])

    def _grad_scaler(self) -> Any:
        """The precision plugin's gradient scaler (fp16 mixed precision), else None."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_optimizers(self) -> Any:
        groups = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                  for g in self.param_groups]
        layers = [i for i, g in enumerate(self.param_groups)
                  if str(g.get("name", "")).startswith("layer.")]
        self._top_group = layers[-1] if layers else None
        factory = self.optimizer_factory
        if self._grad_scaler() is not None and getattr(factory, "keywords", {}).get("fused"):
            # fp16: a fused step unscales the gradients inside itself, after clipping would
            # have had to see them unscaled; the per-tensor step lets the scaler unscale first.
            factory = functools.partial(factory, fused=False)
        optimizer = factory(groups)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(round(self.warmup_ratio * total)), total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
