"""NER and PICO: one tag per word, read from BLURB's `token<TAB>tag` files.

Labels go on the first sub-token of each word; a sentence longer than the model's max length
is split into windows of whole words, so no word is lost to truncation. Predictions are
mapped back to words.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blurbtune.errors import DataError
from blurbtune.tasks.base import Example, Rows, TaskType, label_index, open_text, register


def read_conll(path: Path, task: Any) -> list[Example]:
    """Sentences of a `token<TAB>tag` file; `-DOCSTART-` lines split documents."""
    examples: list[Example] = []
    words: list[str] = []
    tags: list[int] = []
    doc, sent, docs = "", 0, 0
    labels = list(task.labels)

    def flush() -> None:
        nonlocal words, tags, sent
        if words:
            examples.append({"id": f"{doc}s{sent}" if doc else str(len(examples)),
                             "words": words, "gold": tags})
            sent += 1
        words, tags = [], []

    with open_text(path) as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                flush()
                continue
            if line.startswith("-DOCSTART-"):
                flush()
                pmid = line.split("\t")[0][len("-DOCSTART-"):].strip("() ")
                docs += 1
                doc, sent = f"{pmid or f'doc{docs}'}_", 0
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0]:
                raise DataError(path, f"expected 'token<TAB>tag', got {len(fields)} column(s): "
                                      f"{line[:60]!r}", line_no)
            words.append(fields[0])
            tags.append(label_index(labels, fields[1].strip(), path, line_no))
    flush()
    return examples


@register("ner")
@register("pico")
class Tagging(TaskType):
    head = "token"
    problem_type = None

    def read(self, path: Path, task: Any) -> list[Example]:
        return read_conll(path, task)

    def encode(self, batch: dict[str, list], tokenizer: Any, task: Any) -> dict[str, list]:
        budget = int(task.max_length) - tokenizer.num_special_tokens_to_add(pair=False)
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [],
                                "example_idx": [], "word_offset": []}
        if tokenizer.model_input_names and "token_type_ids" in tokenizer.model_input_names:
            out["token_type_ids"] = []
        for idx, words, gold in zip(batch["example_idx"], batch["words"], batch["gold"],
                                    strict=True):
            pieces = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
            lengths = [0] * len(words)
            for w in pieces.word_ids():
                if w is not None:
                    lengths[w] += 1
            for start, end in _windows(lengths, budget):
                enc = tokenizer(words[start:end], is_split_into_words=True, truncation=True,
                                max_length=int(task.max_length))
                labels, seen = [], set()
                for w in enc.word_ids():
                    if w is None or w in seen:
                        labels.append(-100)
                    else:
                        seen.add(w)
                        labels.append(gold[start + w])
                for key in out:
                    if key in enc:
                        out[key].append(enc[key])
                out["labels"].append(labels)
                out["example_idx"].append(idx)
                out["word_offset"].append(start)
        return out

    def decode(self, rows: Rows, examples: Sequence[Example]) -> list[Any]:
        """Per-word tag indices; a word with no sub-token in any window is predicted O (0)."""
        preds = [[0] * len(ex["words"]) for ex in examples]
        filled = [[False] * len(ex["words"]) for ex in examples]
        offsets = rows.word_offset or [0] * len(rows.example_idx)
        for idx, off, logits, labels in zip(rows.example_idx, offsets, rows.logits, rows.labels,
                                            strict=True):
            firsts = logits[labels != -100].argmax(dim=-1).tolist()
            for j, tag in enumerate(firsts):
                preds[idx][off + j] = tag
                filled[idx][off + j] = True
        rows.lost_words = sum(f.count(False) for f in filled)
        return preds

    def to_json(self, value: Any, task: Any) -> Any:
        return [task.labels[t] for t in value]

    def collapsed(self, preds: list[Any], task: Any) -> bool:
        """True when no word of the split is tagged anything but O."""
        outside = list(task.labels).index("O")
        return all(t == outside for p in preds for t in p)

    def count(self, examples: list[Example], task: Any) -> int:
        """Entity mentions (B- tags) for NER; words with a PICO tag (not O) for PICO."""
        labels = list(task.labels)
        if any(lab.startswith("B-") for lab in labels):
            keep = {i for i, lab in enumerate(labels) if lab.startswith("B-")}
        else:
            keep = {i for i, lab in enumerate(labels) if lab != "O"}
        return sum(t in keep for ex in examples for t in ex["gold"])


def _windows(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Split words into consecutive [start, end) spans whose sub-tokens fit the budget."""
    spans, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > budget and i > start:
            spans.append((start, i))
            start, used = i, 0
        used += n
    spans.append((start, len(lengths)))
    return spans
