"""The BLURB score against the published tables shipped with blurbtune."""

from __future__ import annotations

import pandas as pd
import pytest

from blurbtune.blurb import (
    PUBLISHED_TABLES,
    published_blurb,
    published_scores,
    score,
    tasks,
)

# The task types by display name, written out here independently of the task registry.
TYPES = {
    "ner": ["BC5-chem", "BC5-disease", "NCBI-disease", "BC2GM", "JNLPBA"],
    "pico": ["EBM-PICO"],
    "relation": ["ChemProt", "DDI", "GAD"],
    "similarity": ["BIOSSES"],
    "doc_classification": ["HoC"],
    "qa": ["PubMedQA", "BioASQ"],
}


def by_display(column: pd.Series) -> dict[str, float]:
    display = {name: str(cfg.blurb.display) for name, cfg in tasks().items()}
    return {display[name]: float(value) for name, value in column.items()}


def hand_score(scores: dict[str, float]) -> float:
    type_means = [sum(scores[d] for d in ds) / len(ds) for ds in TYPES.values()]
    return sum(type_means) / len(type_means)


def test_registry_agrees_with_the_task_types_written_here():
    display_type = {str(cfg.blurb.display): str(cfg.type) for cfg in tasks().values()}
    assert display_type == {d: t for t, ds in TYPES.items() for d in ds}


def test_gu2021_pubmedbert_and_biobert():
    table = published_scores("gu2021")
    # The means of the printed per-dataset numbers: 81.160778 and 80.338889, which round to
    # the printed 81.16 and 80.34.
    assert score(table["pubmedbert"]) == pytest.approx(81.160778, abs=1e-6)
    assert score(table["biobert"]) == pytest.approx(80.338889, abs=1e-6)
    assert round(score(table["pubmedbert"]), 2) == 81.16
    assert round(score(table["biobert"]), 2) == 80.34


@pytest.mark.parametrize("table", ["gu2021", "linkbert2022"])
def test_every_column_matches_the_printed_blurb_row(table):
    scores, printed = published_scores(table), published_blurb(table)
    assert list(printed.index) == list(scores.columns)
    for model in scores.columns:
        ours = score(scores[model])
        assert ours == pytest.approx(hand_score(by_display(scores[model])), abs=1e-9)
        assert abs(ours - printed[model]) <= 0.005 + 1e-9, model  # printed to 2 decimals


def test_published_tables_are_complete():
    for table in PUBLISHED_TABLES:
        scores = published_scores(table)
        assert sorted(scores.index) == sorted(tasks()), table
        assert scores.notna().all().all()
        assert ((scores >= 0) & (scores <= 100)).all().all()


def test_linkbert_pubmedbert_row_differs_from_gu_on_jnlpba_and_gad_only():
    # Known: the LinkBERT table's PubMedBERT row is not a copy of Gu et al. Table 6.
    gu = published_scores("gu2021")["pubmedbert"]
    linkbert = published_scores("linkbert2022")["pubmedbert_base"]
    differs = sorted(gu.index[(gu - linkbert.reindex(gu.index)).abs() > 1e-9])
    assert differs == ["gad", "jnlpba"]


def test_score_accepts_task_names_display_names_and_either_scale():
    column = published_scores("gu2021")["pubmedbert"]
    expected = score(column)
    assert score(by_display(column)) == pytest.approx(expected, abs=1e-12)
    assert score((column / 100).to_dict()) == pytest.approx(expected / 100, abs=1e-12)


def test_score_errors():
    scores = published_scores("gu2021")["pubmedbert"].to_dict()
    partial = {k: v for k, v in scores.items() if k not in ("hoc", "gad")}
    with pytest.raises(ValueError, match=r"missing: \['gad', 'hoc'\]"):
        score(partial)
    with pytest.raises(ValueError, match="unknown BLURB dataset 'BC5CDR'.*valid:.*bc5chem"):
        score({**scores, "BC5CDR": 90.0})
    with pytest.raises(ValueError, match="twice"):
        score({**scores, "BC5-chem": 93.33})
    with pytest.raises(ValueError, match="NaN"):
        score({**scores, "hoc": float("nan")})


def test_published_table_errors():
    with pytest.raises(ValueError, match="valid"):
        published_scores("gu2020")
    with pytest.raises(ValueError, match="no BLURB score"):
        published_blurb("indus2024")
