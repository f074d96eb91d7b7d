"""What every task type provides, and the registry of task types.

A task type is a reader (files -> examples), a label space, a head (the `transformers`
auto class and its problem type), a decoder (logits -> predictions) and the metric named in
the task's yaml. Adding a type means writing one module that registers a `TaskType`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from blurbtune.errors import DataError

if TYPE_CHECKING:
    import torch  # type hints only: reading data needs no torch

Example = dict[str, Any]

csv.field_size_limit(1 << 30)


@dataclass
class Rows:
    """The model outputs for a split, row by row, as the evaluation loop gathered them."""

    example_idx: list[int]
    logits: list[torch.Tensor]  # one tensor per row ([labels] or [tokens, labels])
    labels: list[torch.Tensor]  # the row's label tensor as fed to the model
    word_offset: list[int] | None = None  # tagging: index of the row's first word
    lost_words: int = 0  # tagging: words that no window covered (set by `decode`)


class TaskType:
    """Base class; subclasses set `head` and implement the reader and the decoder."""

    head: str = "sequence"  # "sequence" or "token"
    problem_type: str | None = "single_label_classification"

    def read(self, path: Path, task: Any) -> list[Example]:
        """Read one split file into examples with an `id` and a `gold` field."""
        raise NotImplementedError

    def num_labels(self, task: Any) -> int:
        return len(task.labels)

    def encode(self, batch: dict[str, list], tokenizer: Any, task: Any) -> dict[str, list]:
        """Tokenise a batch of examples (a `datasets.map(batched=True)` function)."""
        raise NotImplementedError

    def decode(self, rows: Rows, examples: Sequence[Example]) -> list[Any]:
        """Per-example predictions in the gold's form, in the order of `examples`."""
        raise NotImplementedError

    def to_json(self, value: Any, task: Any) -> Any:
        """A gold or predicted value as written to predictions/*.jsonl (label names)."""
        return task.labels[value]

    def collapsed(self, preds: list[Any], task: Any) -> bool:
        """True when every prediction of the split is the same."""
        return len({repr(p) for p in preds}) <= 1

    def count(self, examples: list[Example], task: Any) -> int:
        """Size of a split in BLURB's units (Gu et al. Table 3)."""
        return len(examples)


TYPES: dict[str, TaskType] = {}


def register(name: str) -> Callable[[type[TaskType]], type[TaskType]]:
    def deco(cls: type[TaskType]) -> type[TaskType]:
        TYPES[name] = cls()
        return cls

    return deco


def task_type(name: str) -> TaskType:
    """The registered task type called `name`."""
    import blurbtune.tasks  # noqa: F401  (registers the built-in types)

    if name not in TYPES:
        raise KeyError(f"task.type={name!r} is not a task type; known: {sorted(TYPES)}")
    return TYPES[name]


def label_index(task: Any, value: str, path: Path, line: int) -> int:
    """Index of `value` in the task's labels; `task` may also be the plain list of labels
    (readers pass one, built once: reading a config value per token is slow)."""
    labels = task if isinstance(task, list) else list(task.labels)
    try:
        return labels.index(value)
    except ValueError:
        raise DataError(path, f"unknown label {value!r}; expected one of {labels}", line) from None


BOM = b"\xef\xbb\xbf"


@contextmanager
def open_text(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """A data file opened as UTF-8 (a leading byte-order mark is skipped). A byte that is not
    UTF-8, met anywhere while the block reads, is a DataError naming its line; so is a file
    that cannot be read (a folder, no permission)."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError:
        raise not_utf8(Path(path)) from None
    except OSError as e:
        raise DataError(path, f"cannot be read ({e.strerror or e}); expected a UTF-8 text "
                              "file") from None


def not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8: line, column and value of its first bad byte."""
    data = path.read_bytes()
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line_start = data.rfind(b"\n", 0, at) + 1
        return DataError(path, f"byte 0x{data[at]:02x} at column {at - line_start + 1} is not "
                               f"UTF-8 ({e.reason}); expected UTF-8 text (re-save the file as "
                               "UTF-8)", data.count(b"\n", 0, at) + 1)
    return DataError(path, "could not be decoded as UTF-8")  # the file changed meanwhile


def read_tsv(path: Path, columns: int, header: Sequence[str] | None) -> Iterator[tuple[int, list]]:
    """Yield (line number, fields) of a tab-separated file, checking the column count."""
    with open_text(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            line = reader.line_num
            if line == 1 and header is not None:
                if [c.strip() for c in row] != list(header):
                    raise DataError(path, f"expected the header {list(header)}, got {row}", 1)
                continue
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != columns:
                raise DataError(
                    path, f"expected {columns} tab-separated columns, got {len(row)}", line
                )
            yield line, row


class SequenceTask(TaskType):
    """A single- or multi-label classification or regression over one text or a pair."""

    truncation = "longest_first"

    def encode(self, batch: dict[str, list], tokenizer: Any, task: Any) -> dict[str, list]:
        pair = batch.get("text_pair")
        enc = tokenizer(
            batch["text"],
            pair if pair is not None else None,
            truncation=self.truncation if pair is not None else True,
            max_length=int(task.max_length),
        )
        enc["labels"] = batch["gold"]
        enc["example_idx"] = batch["example_idx"]
        return dict(enc)

    def decode(self, rows: Rows, examples: Sequence[Example]) -> list[Any]:
        out: list[Any] = [None] * len(examples)
        for idx, logit in zip(rows.example_idx, rows.logits, strict=True):
            out[idx] = self.decode_one(logit)
        return out

    def decode_one(self, logits: torch.Tensor) -> Any:
        return int(logits.argmax().item())
