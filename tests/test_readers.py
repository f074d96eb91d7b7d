"""Readers: every BLURB layout read from the fixtures, sizes checked against counts the
fixture generator computed independently, and the real files in ../shared where present."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, SHARED, needs_shared

from blurbtune.blurb import tasks
from blurbtune.data import read_split
from blurbtune.data_check import check
from blurbtune.tasks import task_type

COUNTS = json.loads((FIXTURES / "COUNTS.json").read_text())


@pytest.mark.parametrize("name", sorted(tasks()))
def test_fixture_counts_match_the_generator(name: str) -> None:
    task = tasks()[name]
    for split in ("train", "dev", "test"):
        examples = read_split(task, FIXTURES, split).examples
        found = task_type(task.type).count(examples, task)
        assert found == COUNTS[task.folder][split], (name, split)
        assert len({ex["id"] for ex in examples}) == len(examples)


def test_hoc_groups_sentences_per_abstract_with_union_of_labels(tmp_path) -> None:
    folder = tmp_path / "HoC"
    folder.mkdir()
    flags = lambda on: ",".join(f"{k}_{int(k in on)}" for k in range(10))  # noqa: E731
    rows = ["labels\tsentence\tindex",
            f"{flags({1})}\tSecond sentence .\t42_s1",
            f"{flags({3})}\tFirst sentence .\t42_s0",
            f"{flags(set())}\tAlone .\t7_s0"]
    for split in ("train", "dev", "test"):
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    docs = read_split(tasks()["hoc"], tmp_path, "train").examples
    assert [d["id"] for d in docs] == ["42", "7"]
    assert docs[0]["text"] == "First sentence . Second sentence ."
    assert docs[0]["gold"] == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert docs[1]["gold"] == [0] * 10


def test_ner_reads_devel_tsv_and_skips_docstart() -> None:
    jnlpba = tasks()["jnlpba"]
    assert read_split(jnlpba, FIXTURES, "dev").path.name == "devel.tsv"
    chem = read_split(tasks()["bc5chem"], FIXTURES, "train").examples
    assert all("-DOCSTART-" not in ex["words"] for ex in chem)


@needs_shared
def test_data_check_reproduces_the_shared_counts() -> None:
    """../shared/blurb/README.md: the complete datasets match Gu et al. Table 3 exactly."""
    results = {(c.task, c.split): c for c in check(SHARED)}
    for name in ("ncbi_disease", "bc2gm", "gad", "biosses", "hoc", "pubmedqa"):
        for split in ("train", "dev", "test"):
            c = results[(name, split)]
            assert c.status == "ok", (name, split, c.found, c.expected)
    assert results[("chemprot", "train")].status == "missing"
    assert results[("chemprot", "dev")].status == "ok"
    assert results[("ebmnlp", "train")].status == "missing"
    assert results[("ebmnlp", "test")].found == 16364
    # The distributed dev file has more PICO-tagged words than Table 3, counted as test is
    # (independently here: every word whose tag is not O).
    lines = (SHARED / "ebmnlp" / "dev.tsv").read_text().splitlines()
    tagged = sum(1 for line in lines if "\t" in line and line.rsplit("\t", 1)[1] != "O")
    assert results[("ebmnlp", "dev")].found == tagged == 87308
    assert results[("ebmnlp", "dev")].status == "known"
    assert "test.tsv BLURB distributes matches" in results[("ebmnlp", "dev")].note
    assert results[("bc5chem", "train")].status == "missing"


LAYOUTS = [("biosses", "train.tsv"), ("ncbi_disease", "train.tsv"), ("chemprot", "train.tsv"),
           ("gad", "train.tsv"), ("hoc", "train.tsv"), ("bioasq", "train.tsv"),
           ("pubmedqa", "pqal_fold0/train_set.json")]


@pytest.mark.parametrize("name, file", LAYOUTS)
@pytest.mark.parametrize("change", ["byte-order mark", "CRLF line ends"])
def test_a_bom_or_crlf_reads_as_the_plain_file(tmp_path, name: str, file: str, change: str):
    """A file saved by a Windows editor reads as the same examples. A BOM failed the header
    check (BIOSSES, GAD, HoC, PubMedQA's JSON) or silently became part of the first word or id
    (NCBI-disease's `\\ufeffGermline`, ChemProt's and BioASQ's first id); CRLF already read."""
    import shutil

    task = tasks()[name]
    shutil.copytree(FIXTURES / task.folder, tmp_path / task.folder)
    path = tmp_path / task.folder / file
    raw = path.read_bytes()
    path.write_bytes(b"\xef\xbb\xbf" + raw if change == "byte-order mark"
                     else raw.replace(b"\n", b"\r\n"))
    assert read_split(task, tmp_path, "train").examples == read_split(
        task, FIXTURES, "train").examples
