"""Inputs built as the BLURB paper builds them: single-token entity markers, context-only
truncation for QA, first-sub-token labels for NER."""

from __future__ import annotations

from omegaconf import OmegaConf

from blurbtune.blurb import tasks
from blurbtune.config import compose
from blurbtune.models import load_tokenizer
from blurbtune.tasks import task_type


def tokenizer_for(task: str):
    cfg = compose(["model=tiny", f"task={task}"])
    return load_tokenizer(cfg.model, cfg.task), cfg.task


def test_entity_markers_are_single_tokens() -> None:
    for name in ("chemprot", "ddi", "gad"):
        tok, task = tokenizer_for(name)
        for marker in task.markers:
            assert tok.tokenize(f"of {marker} to") == ["of", marker, "to"], (name, marker)


def test_qa_truncates_the_context_never_the_question() -> None:
    tok, task = tokenizer_for("bioasq")
    task = OmegaConf.merge(task, {"max_length": 32})
    question = "is the braf v600e mutation linked to melanoma ?"
    batch = {"text": [question], "text_pair": ["tumour cells grow " * 100], "gold": [0],
             "example_idx": [0]}
    enc = task_type("qa").encode(batch, tok, task)
    ids = enc["input_ids"][0]
    assert len(ids) == 32
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    assert ids[1:1 + len(q_ids)] == q_ids  # the whole question, right after [CLS]
    assert ids[1 + len(q_ids)] == tok.sep_token_id and ids[-1] == tok.sep_token_id


def test_ner_labels_on_first_sub_token_only() -> None:
    tok, task = tokenizer_for("ncbi_disease")
    words = ["Xylitol", "prevents", "otitis", "media"]
    gold = [0, 0, 1, 2]  # O O B-Disease I-Disease
    enc = task_type("ner").encode({"words": [words], "gold": [gold], "example_idx": [0]},
                                  tok, task)
    labels = enc["labels"][0]
    word_ids = tok(words, is_split_into_words=True).word_ids()
    firsts = [i for i, w in enumerate(word_ids) if w is not None and w != word_ids[i - 1]]
    assert [labels[i] for i in firsts] == gold
    assert all(lab == -100 for i, lab in enumerate(labels) if i not in firsts)
    assert len(tasks()["ncbi_disease"].labels) == 3
