"""Document classification (HoC): sentences grouped per abstract, multi-label hallmarks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from blurbtune.errors import DataError
from blurbtune.tasks.base import Example, SequenceTask, read_tsv, register

if TYPE_CHECKING:
    import torch  # type hints only: reading data needs no torch


@register("doc_classification")
class DocClassification(SequenceTask):
    problem_type = "multi_label_classification"

    def read(self, path: Path, task: Any) -> list[Example]:
        """One example per PMID: its sentences joined in order, the union of their labels."""
        k = len(task.labels)
        docs: dict[str, dict] = {}
        for line, (labels, sentence, index) in read_tsv(path, 3, ("labels", "sentence", "index")):
            pmid, _, sent = index.rpartition("_s")
            if not pmid or not sent.isdigit():
                raise DataError(path, f"expected an index '<PMID>_s<N>', got {index!r}", line)
            doc = docs.setdefault(pmid, {"id": pmid, "sents": [], "gold": [0.0] * k})
            doc["sents"].append((int(sent), sentence))
            for item in labels.split(","):
                hallmark, _, flag = item.strip().partition("_")
                if not (hallmark.isdigit() and int(hallmark) < k and flag in ("0", "1")):
                    raise DataError(path, f"expected labels like '0_0,1_1,...,{k - 1}_0' "
                                          f"(hallmark 0-{k - 1}, flag 0/1), got {item!r}", line)
                if flag == "1":
                    doc["gold"][int(hallmark)] = 1.0
        return [
            {"id": d["id"], "text": " ".join(s for _, s in sorted(d["sents"])), "gold": d["gold"]}
            for d in docs.values()
        ]

    def decode_one(self, logits: torch.Tensor) -> Any:
        return [float(v) for v in (logits > 0).int().tolist()]

    def to_json(self, value: Any, task: Any) -> Any:
        return [name for name, v in zip(task.labels, value, strict=True) if v]
