"""Yes/no(/maybe) question answering: PubMedQA (JSON) and BioASQ 7b (tsv).

Input is `[CLS] question [SEP] context [SEP]`; only the context is truncated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blurbtune.errors import DataError
from blurbtune.tasks.base import (
    Example,
    SequenceTask,
    label_index,
    open_text,
    read_tsv,
    register,
)


@register("qa")
class QuestionAnswering(SequenceTask):
    truncation = "only_second"

    def read(self, path: Path, task: Any) -> list[Example]:
        if task.get("format") == "pubmedqa_json":
            return _read_pubmedqa(path, task)
        labels = list(task.labels)
        return [
            {"id": row[0], "text": row[1], "text_pair": row[2],
             "gold": label_index(labels, row[3].strip(), path, line)}
            for line, row in read_tsv(path, 4, None)
        ]


def _read_pubmedqa(path: Path, task: Any) -> list[Example]:
    with open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON: {e.msg}", e.lineno) from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object {pmid: {QUESTION, CONTEXTS, ...}}")
    examples = []
    for pmid, item in data.items():
        if not isinstance(item, dict):
            raise DataError(path, f"entry {pmid!r} is a JSON {type(item).__name__}; expected an "
                                  "object with QUESTION, CONTEXTS and final_decision")
        missing = [k for k in ("QUESTION", "CONTEXTS", "final_decision") if k not in item]
        if missing:
            raise DataError(path, f"entry {pmid!r} lacks {missing}; expected QUESTION, "
                                  "CONTEXTS and final_decision")
        contexts = item["CONTEXTS"]
        if not isinstance(item["QUESTION"], str) or not (
                isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)):
            raise DataError(path, f"entry {pmid!r}: expected QUESTION a string and CONTEXTS a "
                                  "list of strings")
        decision = str(item["final_decision"])
        if decision not in task.labels:
            raise DataError(path, f"entry {pmid!r}: unknown final_decision {decision!r}; "
                                  f"expected one of {list(task.labels)}")
        examples.append({"id": str(pmid), "text": item["QUESTION"],
                         "text_pair": " ".join(item["CONTEXTS"]),
                         "gold": list(task.labels).index(decision)})
    return examples
