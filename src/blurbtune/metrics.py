"""The BLURB metrics: pure functions, and torchmetrics classes that accumulate over batches.

Argument order: the pure functions follow scikit-learn and seqeval, `f(gold, pred)`; the
torchmetrics classes follow torchmetrics, `update(pred, gold)`. Scores are fractions in
[0, 1] (Pearson r in [-1, 1]), never x100.

Undefined values are 0.0, never NaN: an F1 with no gold and no predicted positives, a
Pearson r where either side is constant (a collapsed regression head), an accuracy on no
items. A degenerate run therefore scores 0 and sorts last.

This module imports neither Hydra nor Lightning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

Tags = Sequence[str]
Entity = tuple[str, int, int]

PICO_CLASSES: tuple[str, ...] = ("PAR", "INT", "OUT")


# ---------------------------------------------------------------- counting helpers


def _f1(tp: float, fp: float, fn: float) -> float:
    """F1 from counts, 2TP / (2TP + FP + FN); 0.0 when there is nothing to count."""
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else 0.0


def _check_same_length(gold: Sequence[Any], pred: Sequence[Any], what: str = "items") -> None:
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} {what}, pred has {len(pred)}")


def _split_tag(tag: str) -> tuple[str, str]:
    """`"B-Chemical"` -> `("B", "Chemical")`; `"O"` -> `("O", "")`."""
    if tag == "O":
        return "O", ""
    prefix, sep, entity_type = tag.partition("-")
    if not sep or prefix not in ("B", "I") or not entity_type:
        raise ValueError(f"not an IOB2 tag: {tag!r} (expected 'O', 'B-<type>' or 'I-<type>')")
    return prefix, entity_type


# ---------------------------------------------------------------- pure functions


def extract_entities(tags: Tags) -> set[Entity]:
    """The entities of one IOB2-tagged sentence, as `(type, start, end)` with `end` exclusive.

    Follows seqeval's default (non-strict) mode: an entity runs from a `B-X`, or from an
    `I-X` that does not continue an open `X` entity, over the following `I-X` tags. So
    `I-X` after `O`, after another type, or first in the sentence starts an entity, and an
    entity still open at the end of the sentence is kept.

    >>> sorted(extract_entities(["B-Chemical", "I-Chemical", "O", "I-Disease"]))
    [('Chemical', 0, 2), ('Disease', 3, 4)]
    """
    entities: set[Entity] = set()
    start: int | None = None
    open_type = ""
    for i, tag in enumerate(tags):
        prefix, entity_type = _split_tag(tag)
        if start is not None and (prefix != "I" or entity_type != open_type):
            entities.add((open_type, start, i))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, open_type = i, entity_type
    if start is not None:
        entities.add((open_type, start, len(tags)))
    return entities


def _entity_counts(gold: Sequence[Tags], pred: Sequence[Tags]) -> tuple[int, int, int]:
    _check_same_length(gold, pred, "sentences")
    tp = fp = fn = 0
    for i, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {i}: gold has {len(gold_tags)} tags, pred has {len(pred_tags)}"
            )
        gold_entities, pred_entities = extract_entities(gold_tags), extract_entities(pred_tags)
        hits = len(gold_entities & pred_entities)
        tp += hits
        fp += len(pred_entities) - hits
        fn += len(gold_entities) - hits
    return tp, fp, fn


def entity_f1(gold: Sequence[Tags], pred: Sequence[Tags]) -> float:
    """Entity-level micro F1 over exact (span, type) matches in IOB2-tagged sentences.

    The BLURB NER metric; equal to seqeval's `f1_score` in its default mode. Tags are per
    word. No gold and no predicted entities gives 0.0.

    >>> entity_f1([["B-Disease", "I-Disease", "O"]], [["B-Disease", "O", "O"]])
    0.0
    """
    return _f1(*_entity_counts(gold, pred))


def _pico_class(tag: str) -> str:
    """`"I-PAR"` -> `"PAR"`; `"O"` -> `""`."""
    return "" if tag == "O" else tag.rpartition("-")[2]


def _pico_counts(gold: Sequence[Tags], pred: Sequence[Tags], classes: Sequence[str]) -> np.ndarray:
    """Per-class word counts, shape `[len(classes), 3]`: TP, FP, FN."""
    _check_same_length(gold, pred, "sentences")
    gold_words: list[str] = []
    pred_words: list[str] = []
    for i, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {i}: gold has {len(gold_tags)} tags, pred has {len(pred_tags)}"
            )
        gold_words.extend(_pico_class(tag) for tag in gold_tags)
        pred_words.extend(_pico_class(tag) for tag in pred_tags)
    gold_arr, pred_arr = np.asarray(gold_words, dtype=str), np.asarray(pred_words, dtype=str)
    counts = np.zeros((len(classes), 3), dtype=np.int64)
    for k, name in enumerate(classes):
        is_gold, is_pred = gold_arr == name, pred_arr == name
        counts[k] = [
            (is_gold & is_pred).sum(),
            (~is_gold & is_pred).sum(),
            (is_gold & ~is_pred).sum(),
        ]
    return counts


def pico_f1_per_class(
    gold: Sequence[Tags], pred: Sequence[Tags], classes: Sequence[str] = PICO_CLASSES
) -> dict[str, float]:
    """Word-level F1 of each PICO class: a word is a hit for `PAR` when both tags are `PAR`.

    Each class is the binary decision "this word has the class" over all words of all
    sentences. The `I-`/`B-` prefix is ignored, so `I-PAR` and `B-PAR` both mean `PAR`.
    """
    counts = _pico_counts(gold, pred, classes)
    return {name: _f1(*counts[k]) for k, name in enumerate(classes)}


def pico_f1(
    gold: Sequence[Tags], pred: Sequence[Tags], classes: Sequence[str] = PICO_CLASSES
) -> float:
    """The BLURB EBM-PICO metric: the mean of the word-level F1 of PAR, INT and OUT."""
    return float(np.mean(list(pico_f1_per_class(gold, pred, classes).values())))


def _relation_counts(
    gold: np.ndarray, pred: np.ndarray, negative: Hashable
) -> tuple[int, int, int]:
    _check_same_length(gold, pred)
    gold_positive, pred_positive = gold != negative, pred != negative
    tp = int(((pred == gold) & gold_positive).sum())
    return tp, int(pred_positive.sum()) - tp, int(gold_positive.sum()) - tp


def relation_f1(
    gold: Sequence[str | int] | np.ndarray,
    pred: Sequence[str | int] | np.ndarray,
    negative: str | int,
) -> float:
    """Micro F1 over the positive classes: the BLURB metric of ChemProt, DDI and GAD.

    TP = predictions equal to a positive gold label; precision divides by the predictions
    that are not `negative`, recall by the gold labels that are not `negative`. The negative
    class is never a hit. All-negative gold and predictions give 0.0 (scikit-learn's
    `f1_score(..., labels=positive_labels, average="micro", zero_division=0)`).

    >>> relation_f1(["false", "CPR:3", "CPR:4"], ["CPR:3", "CPR:3", "false"], "false")
    0.5
    """
    return _f1(*_relation_counts(np.asarray(gold), np.asarray(pred), negative))


def pearson(gold: Sequence[float] | np.ndarray, pred: Sequence[float] | np.ndarray) -> float:
    """Pearson's r, the BIOSSES metric.

    r is undefined when either side is constant, or with fewer than two pairs; that gives
    0.0, so a regression head that collapsed to one value scores 0, never NaN.
    """
    _check_same_length(gold, pred)
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(gold, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    r = float((xc * yc).sum() / np.sqrt((xc * xc).sum() * (yc * yc).sum()))
    return min(1.0, max(-1.0, r))


def _multilabel_counts(gold: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    if gold.shape != pred.shape or gold.ndim != 2:
        raise ValueError(f"expected two [n, k] arrays, got {gold.shape} and {pred.shape}")
    g, p = gold.astype(bool), pred.astype(bool)
    return int((g & p).sum()), int((~g & p).sum()), int((g & ~p).sum())


def multilabel_f1(gold: np.ndarray | Sequence[Sequence[int]], pred: Any) -> float:
    """Micro F1 over every (document, label) decision of 0/1 arrays `[n, k]`: the HoC metric."""
    return _f1(*_multilabel_counts(np.asarray(gold), np.asarray(pred)))


def accuracy(gold: Sequence[Hashable] | np.ndarray, pred: Sequence[Hashable] | np.ndarray) -> float:
    """The fraction of predictions equal to the gold label (PubMedQA, BioASQ); 0.0 if empty."""
    _check_same_length(gold, pred)
    if len(gold) == 0:
        return 0.0
    return float((np.asarray(gold) == np.asarray(pred)).mean())


METRICS: dict[str, Callable[..., float]] = {
    "entity_f1": entity_f1,
    "pico_f1": pico_f1,
    "relation_f1": relation_f1,
    "pearson": pearson,
    "multilabel_f1": multilabel_f1,
    "accuracy": accuracy,
}


def _majority(labels: Sequence[Hashable]) -> Hashable:
    """The most frequent label; a tie goes to the label seen first."""
    if len(labels) == 0:
        raise ValueError("no training labels to take the majority of")
    return Counter(labels).most_common(1)[0][0]


def constant_baseline(
    metric: str,
    gold_train: Any,
    gold_eval: Any,
    negative_label: str | int | None = None,
) -> float:
    """The score of the constant predictor on an eval split: the floor a real run must beat.

    The constant is learnt from `gold_train` (labels in the same form the metric takes):
    the majority label for `accuracy` and `relation_f1` (which needs `negative_label`),
    all-`O` for `entity_f1` and `pico_f1` (0.0), the train mean for `pearson` (0.0), and
    each label's majority (present when more than half the training rows have it) for
    `multilabel_f1`. A run that scores no better than this has learnt nothing.

    >>> constant_baseline("accuracy", ["yes", "yes", "no"], ["yes", "no", "no", "no"])
    0.25
    """
    if metric in ("entity_f1", "pico_f1"):
        pred = [["O"] * len(tags) for tags in gold_eval]
        return METRICS[metric](gold_eval, pred)
    if metric == "accuracy":
        return accuracy(gold_eval, [_majority(list(gold_train))] * len(gold_eval))
    if metric == "relation_f1":
        if negative_label is None:
            raise ValueError("relation_f1 needs negative_label")
        pred = [_majority(list(gold_train))] * len(gold_eval)
        return relation_f1(gold_eval, pred, negative_label)
    if metric == "pearson":
        return pearson(gold_eval, np.full(len(gold_eval), np.mean(gold_train)))
    if metric == "multilabel_f1":
        train = np.asarray(gold_train)
        majority_row = (train.mean(axis=0) > 0.5).astype(np.int64)
        return multilabel_f1(gold_eval, np.tile(majority_row, (len(gold_eval), 1)))
    raise ValueError(f"unknown metric {metric!r}; valid: {sorted(METRICS)}")


# ---------------------------------------------------------------- torchmetrics classes


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float tensor on `like`'s device (float64 where the device has it)."""
    dtype = torch.float32 if like.device.type == "mps" else torch.float64
    return torch.tensor(value, dtype=dtype, device=like.device)


class _CountF1(Metric):
    """F1 from TP/FP/FN counts summed over batches (and processes)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, tp: Any, fp: Any, fn: Any) -> None:
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def compute(self) -> torch.Tensor:
        return _scalar(_f1(self.tp.item(), self.fp.item(), self.fn.item()), self.tp)


class EntityF1(_CountF1):
    """Entity-level micro F1 (see `entity_f1`); `update(pred, gold)` takes word tag lists."""

    def update(self, pred: Sequence[Tags], gold: Sequence[Tags]) -> None:
        """Add a batch: `pred` first, `gold` second, each a list of per-word tag lists."""
        self._add(*_entity_counts(gold, pred))


class RelationF1(_CountF1):
    """Micro F1 over positive classes (see `relation_f1`) on label indices."""

    def __init__(self, negative_index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.negative_index = negative_index

    def update(self, pred: torch.Tensor, gold: torch.Tensor) -> None:
        """Add a batch: `pred` first, `gold` second, both LongTensors of label indices."""
        if pred.shape != gold.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gold {tuple(gold.shape)} differ")
        gold_positive = gold != self.negative_index
        tp = ((pred == gold) & gold_positive).sum()
        self._add(tp, (pred != self.negative_index).sum() - tp, gold_positive.sum() - tp)


class MultilabelF1(_CountF1):
    """Micro F1 over all (document, label) decisions (see `multilabel_f1`)."""

    def update(self, pred: torch.Tensor, gold: torch.Tensor) -> None:
        """Add a batch: `pred` first, `gold` second, both 0/1 tensors of shape `[n, k]`."""
        if pred.shape != gold.shape or pred.dim() != 2:
            raise ValueError(
                f"expected two [n, k] tensors, got {tuple(pred.shape)} and {tuple(gold.shape)}"
            )
        g, p = gold.bool(), pred.bool()
        self._add((g & p).sum(), (~g & p).sum(), (g & ~p).sum())


class PicoF1(Metric):
    """Mean word-level F1 of the PICO classes (see `pico_f1`); per-class counts as states."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, classes: Sequence[str] = PICO_CLASSES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classes = tuple(classes)
        zeros = torch.zeros(len(self.classes), 3, dtype=torch.long)
        self.add_state("counts", default=zeros, dist_reduce_fx="sum")

    def update(self, pred: Sequence[Tags], gold: Sequence[Tags]) -> None:
        """Add a batch: `pred` first, `gold` second, each a list of per-word tag lists."""
        counts = _pico_counts(gold, pred, self.classes)
        self.counts += torch.from_numpy(counts).to(self.counts.device)

    def compute_per_class(self) -> dict[str, float]:
        """The F1 of each class so far."""
        counts = self.counts.tolist()
        return {name: _f1(*counts[k]) for k, name in enumerate(self.classes)}

    def compute(self) -> torch.Tensor:
        return _scalar(float(np.mean(list(self.compute_per_class().values()))), self.counts)


class Accuracy(Metric):
    """Accuracy on label indices (see `accuracy`)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, gold: torch.Tensor) -> None:
        """Add a batch: `pred` first, `gold` second, both LongTensors of label indices."""
        if pred.shape != gold.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gold {tuple(gold.shape)} differ")
        self.correct += (pred == gold).sum()
        self.total += gold.numel()

    def compute(self) -> torch.Tensor:
        total = self.total.item()
        return _scalar(self.correct.item() / total if total else 0.0, self.correct)


class Pearson(Metric):
    """Pearson's r (see `pearson`) from float64 sums, with the constant -> 0.0 rule.

    The states are n and the sums of x, y, x*x, y*y, x*y plus the min and max of each side
    (to detect a constant prediction exactly), so batches and processes combine by summing.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("n", "sx", "sy", "sxx", "syy", "sxy"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
        inf = torch.tensor(float("inf"), dtype=torch.float64)
        for side in ("x", "y"):
            self.add_state(f"{side}_min", default=inf.clone(), dist_reduce_fx="min")
            self.add_state(f"{side}_max", default=-inf.clone(), dist_reduce_fx="max")

    def update(self, pred: torch.Tensor, gold: torch.Tensor) -> None:
        """Add a batch: `pred` first, `gold` second, both 1-d float tensors."""
        if pred.shape != gold.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gold {tuple(gold.shape)} differ")
        if pred.numel() == 0:
            return
        x = pred.detach().reshape(-1).to(torch.float64)
        y = gold.detach().reshape(-1).to(torch.float64)
        self.n += x.numel()
        self.sx += x.sum()
        self.sy += y.sum()
        self.sxx += (x * x).sum()
        self.syy += (y * y).sum()
        self.sxy += (x * y).sum()
        self.x_min = torch.minimum(self.x_min, x.min())
        self.x_max = torch.maximum(self.x_max, x.max())
        self.y_min = torch.minimum(self.y_min, y.min())
        self.y_max = torch.maximum(self.y_max, y.max())

    def compute(self) -> torch.Tensor:
        n = self.n.item()
        constant = self.x_min >= self.x_max or self.y_min >= self.y_max
        if n < 2 or constant:
            return _scalar(0.0, self.n)
        var_x = self.sxx.item() - self.sx.item() ** 2 / n
        var_y = self.syy.item() - self.sy.item() ** 2 / n
        if var_x <= 0 or var_y <= 0:
            return _scalar(0.0, self.n)
        cov = self.sxy.item() - self.sx.item() * self.sy.item() / n
        r = cov / (var_x * var_y) ** 0.5
        return _scalar(min(1.0, max(-1.0, r)), self.n)


def build_metric(
    name: str, labels: Sequence[str] | None = None, negative_label: str | None = None
) -> Metric:
    """The torchmetrics object for a task's `metric:` name.

    `relation_f1` needs `labels` and `negative_label` (the negative class's index is
    `labels.index(negative_label)`); `pico_f1` takes its classes from `labels` when given
    (the non-`O` tags without their prefix). Every metric's `update` is `update(pred, gold)`.
    """
    if name == "entity_f1":
        return EntityF1()
    if name == "pico_f1":
        if labels is None:
            return PicoF1()
        classes = list(dict.fromkeys(_pico_class(tag) for tag in labels if tag != "O"))
        return PicoF1(classes)
    if name == "relation_f1":
        if labels is None or negative_label is None:
            raise ValueError("relation_f1 needs labels and negative_label")
        labels = list(labels)
        if negative_label not in labels:
            raise ValueError(f"negative_label {negative_label!r} is not in labels {labels}")
        return RelationF1(labels.index(negative_label))
    if name == "pearson":
        return Pearson()
    if name == "multilabel_f1":
        return MultilabelF1()
    if name == "accuracy":
        return Accuracy()
    raise ValueError(f"unknown metric {name!r}; valid: {sorted(METRICS)}")
