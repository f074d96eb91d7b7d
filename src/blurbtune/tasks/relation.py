"""Relation extraction (ChemProt, DDI, GAD): `id<TAB>sentence<TAB>label` with entity markers.

The markers (`@GENE$`, `@CHEMICAL$`, ...) are added to the tokenizer as single tokens by the
model loader; the task yaml lists them under `markers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blurbtune.tasks.base import Example, SequenceTask, label_index, read_tsv, register


@register("relation")
class Relation(SequenceTask):
    def read(self, path: Path, task: Any) -> list[Example]:
        header = ("index", "sentence", "label") if task.get("header") else None
        labels = list(task.labels)
        return [
            {"id": row[0], "text": row[1], "gold": label_index(labels, row[2].strip(), path, line)}
            for line, row in read_tsv(path, 3, header)
        ]
