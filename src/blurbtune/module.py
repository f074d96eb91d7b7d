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

from blurbtune.diagnostics import GradientStats, grad_norms, part_params
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


def best_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state to restore later, in host memory (never a second copy on the GPU).

    Frozen parameters (`requires_grad=False`) cannot change during training, so on the CPU they
    are kept by reference rather than copied.
    """
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    return {k: v.detach() if id(v) in frozen and v.device.type == "cpu"
            else v.detach().to("cpu", copy=True)
            for k, v in model.state_dict(keep_vars=True).items()}


class FineTuner(pl.LightningModule):
    """Fine-tunes `model`; evaluation gathers row outputs and scores whole splits."""

    def __init__(self, model: torch.nn.Module, task: Any, param_groups: list[dict],
                 optimizer_factory: Callable, warmup_ratio: float,
                 examples: Callable[[str], list[dict]], test_every_epoch: bool = False) -> None:
        super().__init__()
        self.model, self.task = model, task
        self.kind = task_type(task.type)
        self.param_groups = param_groups
        self.optimizer_factory, self.warmup_ratio = optimizer_factory, warmup_ratio
        self.examples = examples
        self.test_every_epoch = test_every_epoch  # score test after each dev evaluation too
        self._rows: dict[str, list] = {}
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_step = -1  # global step at which best_state was taken
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_dev: dict | None = None  # predictions and score of the best dev epoch
        self.history: list[dict] = []  # one entry per dev evaluation: epoch, step, score
        self.trained_epoch = 0  # the epoch of the latest training step
        self.outputs: dict[str, dict] = {}  # split -> {"preds", "score"} of the latest evaluation
        self.grad_stats: GradientStats | None = None
        self._grad_state: dict | None = None  # from a checkpoint, applied when training starts
        self._parts: dict[str, list] = {}
        self._loss_sum: torch.Tensor | float = 0.0  # training loss since the last evaluation
        self._loss_n = 0
        self._top_group: int | None = None  # optimizer group of the top encoder layer

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.trained_epoch = self.current_epoch
        loss = self(batch).loss
        if not torch.isfinite(loss):
            raise DivergedError(f"training loss became {loss.item()} at epoch {self.current_epoch}"
                                f", step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch["input_ids"].shape[0])
        self._loss_sum = self._loss_sum + loss.detach()
        self._loss_n += 1
        return loss

    def on_train_start(self) -> None:
        self._parts = part_params(self.model)
        early = round(self.warmup_ratio * self.trainer.estimated_stepping_batches)
        self.grad_stats = GradientStats(self._parts, early, self.trainer.gradient_clip_val)
        if self._grad_state is not None:
            self.grad_stats.load_state_dict(self._grad_state)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-part gradient norms before clipping (Lightning clips after this hook): summed
        every step, logged only on the steps Lightning writes (`log_every_n_steps`)."""
        norms = grad_norms(self._parts)
        self.grad_stats.update(norms)
        # The same test Lightning applies when it writes this step's metrics (after the step).
        if self.trainer._logger_connector.should_update_logs:
            self.log_dict({f"grad_norm/{name}": norms[i]
                           for i, name in enumerate(self.grad_stats.names)},
                          on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as `trainer.gradient_clip_val` says. Lightning's mixed-precision plugin refuses
        any fused optimizer, for fear that a gradient scaler left the gradients scaled; bf16 has
        no scaler, so there the gradients are the true ones and are clipped here, over the
        optimizer's parameters as Lightning would."""
        plugin = self.trainer.precision_plugin
        if (not gradient_clip_val or self._grad_scaler() is not None
                or not isinstance(plugin, MixedPrecision)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable | None = None) -> None:
        """Step, then free the gradients at once: Lightning would clear them only after the
        next batch's forward pass, which then holds a whole extra copy of them."""
        optimizer.step(closure=optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def _epoch_record(self, dev: float, epoch: int) -> dict:
        """One history row: epoch, step, dev score, mean training loss since the last
        evaluation, and the top encoder layer's current learning rate."""
        loss = float(self._loss_sum / self._loss_n) if self._loss_n else None
        self._loss_sum, self._loss_n = 0.0, 0
        lr_top = None
        if self._top_group is not None and self.trainer.optimizers:
            lr_top = float(self.trainer.optimizers[0].param_groups[self._top_group]["lr"])
        return {"epoch": epoch, "step": self.global_step, "dev": dev, "train_loss": loss,
                "lr_top": lr_top}

    def _gather(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        logits = self(batch).logits.detach().float().cpu()
        rows = self._rows.setdefault(split, [])
        mask = batch["attention_mask"].bool().cpu()
        labels = batch["labels"].cpu()
        offsets = batch.get("word_offset")
        for i, idx in enumerate(batch["example_idx"].tolist()):
            if self.kind.head == "token":
                rows.append((idx, logits[i][mask[i]], labels[i][mask[i]],
                             int(offsets[i]) if offsets is not None else 0))
            else:
                rows.append((idx, logits[i], labels[i], 0))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._gather("dev", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._gather("test", batch)

    def evaluate_rows(self, split: str) -> dict:
        """Decode the gathered rows of `split` into predictions and score them."""
        raw = sorted(_all_ranks(self._rows.pop(split, [])), key=lambda r: (r[0], r[3]))
        rows = Rows([r[0] for r in raw], [r[1] for r in raw], [r[2] for r in raw],
                    [r[3] for r in raw])
        examples = self.examples(split)
        preds = self.kind.decode(rows, examples)
        gold = [ex["gold"] for ex in examples]
        out = {"preds": preds, "score": score(self.task, preds, gold),
               "lost_words": rows.lost_words}
        self.outputs[split] = out
        return out

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._rows.pop("dev", None)
            return
        out = self.evaluate_rows("dev")
        self.log(f"dev/{self.task.metric}", out["score"], prog_bar=True)
        # Not current_epoch: after fit (see dev_is_stale) it has moved past the last epoch.
        epoch = self.trained_epoch
        record = self._epoch_record(out["score"], epoch)
        if self.test_every_epoch:
            record["test"] = self._score_test_now()
        self.history.append(record)
        if out["score"] > self.best_score:
            self.best_score, self.best_epoch = out["score"], epoch
            self.best_step = self.global_step
            self.best_state = best_weights(self.model)
            self.best_dev = out

    def _score_test_now(self) -> float:
        """The current weights' test score, for the record only (never used to select): the
        test loader draws from its own generator, so training's random stream is untouched."""
        loader = self.trainer.datamodule.test_dataloader()
        with self.trainer.precision_plugin.test_step_context():
            for batch in loader:
                self._gather("test", self.transfer_batch_to_device(batch, self.device, 0))
        return self.evaluate_rows("test")["score"]

    def best_is_last(self) -> bool:
        """Whether the best-on-dev weights are the model's current weights (the last
        evaluation set the best and no step came after it): then they need no second test."""
        return self.best_state is not None and self.best_step == self.global_step

    def dev_is_stale(self) -> bool:
        """Whether training stepped after the latest dev evaluation, or none ran: training
        ended by `max_steps`, or between `val_check_interval`s or `check_val_every_n_epoch`s.
        Then the caller evaluates dev once more, so the last model has a dev score and the
        best-on-dev model exists."""
        return not self.history or self.history[-1]["step"] < self.global_step

    def on_test_epoch_end(self) -> None:
        out = self.evaluate_rows("test")
        self.log(f"test/{self.task.metric}", out["score"])

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["blurbtune"] = {"best_score": self.best_score, "best_epoch": self.best_epoch,
                                   "best_step": self.best_step,
                                   "best_state": self.best_state, "history": self.history,
                                   "best_dev": self.best_dev,
                                   "grad_stats": self.grad_stats.state_dict()
                                   if self.grad_stats else None,
                                   "loss_since_eval": (self._loss_sum, self._loss_n),
                                   "trained_epoch": self.trained_epoch}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("blurbtune", {})
        self.best_score = state.get("best_score", -math.inf)
        self.best_epoch = state.get("best_epoch", -1)
        self.best_step = state.get("best_step", -1)
        self.best_state = state.get("best_state")
        self.history = state.get("history", [])
        self.best_dev = state.get("best_dev")
        self._grad_state = state.get("grad_stats")
        self._loss_sum, self._loss_n = state.get("loss_since_eval", (0.0, 0))
        self.trained_epoch = state.get("trained_epoch", 0)
