"""The BLURB metrics against independent implementations (seqeval, scikit-learn, scipy)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.metrics.sequence_labeling import get_entities
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score as sklearn_f1

from blurbtune.metrics import (
    METRICS,
    PICO_CLASSES,
    build_metric,
    constant_baseline,
    entity_f1,
    extract_entities,
    multilabel_f1,
    pearson,
    pico_f1,
    pico_f1_per_class,
    relation_f1,
)
from blurbtune.metrics import accuracy as blurb_accuracy

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")


def random_tags(rng: random.Random, length: int, types: tuple[str, ...]) -> list[str]:
    """Any mix of B-/I-/O over `types`, so I- without B- and type switches are common."""
    return [rng.choice(["O"] + [f"{p}-{t}" for p in "BI" for t in types]) for _ in range(length)]


def random_corpus(seed: int, types: tuple[str, ...] = ("Chemical", "Disease")):
    rng = random.Random(seed)
    lengths = [rng.randint(0, 12) for _ in range(rng.randint(1, 8))]
    gold = [random_tags(rng, n, types) for n in lengths]
    # Half the time a noisy copy of gold, so there are matches to find.
    if rng.random() < 0.5:
        pred = [
            [t if rng.random() < 0.8 else rng.choice(random_tags(rng, 1, types)) for t in s]
            for s in gold
        ]
    else:
        pred = [random_tags(rng, n, types) for n in lengths]
    return gold, pred


def seqeval_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """seqeval's entities with an exclusive end."""
    return {(t, s, e + 1) for t, s, e in get_entities(tags)}


# ---------------------------------------------------------------- entity_f1

HAND_CASES = [
    (["B-Chemical", "I-Chemical", "O"], {("Chemical", 0, 2)}),
    (["I-Chemical", "I-Chemical", "O"], {("Chemical", 0, 2)}),  # I- without B- starts one
    (["O", "I-Disease"], {("Disease", 1, 2)}),  # I- after O, at the sentence end
    (["B-Chemical", "I-Disease"], {("Chemical", 0, 1), ("Disease", 1, 2)}),  # type switch
    (["B-Chemical", "B-Chemical"], {("Chemical", 0, 1), ("Chemical", 1, 2)}),
    (["I-Chemical", "B-Chemical", "I-Chemical"], {("Chemical", 0, 1), ("Chemical", 1, 3)}),
    (["B-cell_type", "I-cell_type", "I-cell_type"], {("cell_type", 0, 3)}),
    ([], set()),
    (["O", "O"], set()),
]


@pytest.mark.parametrize(("tags", "expected"), HAND_CASES)
def test_extract_entities_hand_cases(tags, expected):
    assert extract_entities(tags) == expected
    assert seqeval_spans(tags) == expected


def test_extract_entities_matches_seqeval_on_random_sentences():
    rng = random.Random(0)
    for _ in range(3000):
        tags = random_tags(rng, rng.randint(0, 15), ("A", "B"))
        assert extract_entities(tags) == seqeval_spans(tags), tags


def test_extract_entities_rejects_non_iob2_tags():
    with pytest.raises(ValueError, match="IOB2"):
        extract_entities(["E-Chemical"])


def test_entity_f1_hand_worked():
    gold = [["B-Chemical", "I-Chemical", "O", "B-Disease"], ["O", "B-Disease", "I-Disease"]]
    pred = [["B-Chemical", "I-Chemical", "O", "O"], ["I-Disease", "I-Disease", "I-Disease"]]
    # gold: (Chemical,0,2) (Disease,3,4) | (Disease,1,3)
    # pred: (Chemical,0,2)               | (Disease,0,3)
    # TP = 1 (Chemical 0-2), FP = 1 (Disease 0-3 in s2), FN = 2 (Disease 3-4, Disease 1-3)
    # P = 1/2, R = 1/3, F1 = 2PR/(P+R) = 2/5
    assert entity_f1(gold, pred) == pytest.approx(0.4, abs=1e-15)
    assert seqeval_f1(gold, pred) == pytest.approx(0.4, abs=1e-15)


def test_entity_f1_extremes():
    gold = [["B-Chemical", "I-Chemical", "O"], ["I-Disease"]]
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1(gold, [["O"] * 3, ["O"]]) == 0.0
    assert entity_f1([["O", "O"]], [["O", "O"]]) == 0.0 == seqeval_f1([["O", "O"]], [["O", "O"]])


def test_entity_f1_matches_seqeval_on_random_corpora():
    for seed in range(1500):
        gold, pred = random_corpus(seed)
        assert entity_f1(gold, pred) == pytest.approx(seqeval_f1(gold, pred), abs=1e-12), seed


def test_entity_f1_entities_do_not_cross_sentences():
    # In one sentence B-X I-X is one entity; split across two sentences it is two.
    gold = [["B-Disease"], ["I-Disease"]]
    pred = [["B-Disease"], ["B-Disease"]]
    assert entity_f1(gold, pred) == seqeval_f1(gold, pred) == 1.0


def test_entity_f1_length_mismatch():
    with pytest.raises(ValueError):
        entity_f1([["O", "O"]], [["O"]])
    with pytest.raises(ValueError):
        entity_f1([["O"]], [["O"], ["O"]])


# ---------------------------------------------------------------- pico_f1

PICO_TAGS = ["O", "I-PAR", "I-INT", "I-OUT"]


def sklearn_pico(gold, pred):
    flat_gold = [t for s in gold for t in s]
    flat_pred = [t for s in pred for t in s]
    per_class = {}
    for name in PICO_CLASSES:
        g = [t == f"I-{name}" for t in flat_gold]
        p = [t == f"I-{name}" for t in flat_pred]
        per_class[name] = sklearn_f1(g, p, zero_division=0)
    return per_class


def test_pico_f1_hand_worked():
    gold = [["I-PAR", "I-PAR", "O", "I-INT"], ["I-OUT", "O"]]
    pred = [["I-PAR", "O", "I-INT", "I-INT"], ["I-OUT", "I-OUT"]]
    # PAR: TP 1, FP 0, FN 1 -> 2/3; INT: TP 1, FP 1, FN 0 -> 2/3; OUT: TP 1, FP 1 -> 2/3
    per_class = pico_f1_per_class(gold, pred)
    assert per_class == pytest.approx({"PAR": 2 / 3, "INT": 2 / 3, "OUT": 2 / 3})
    assert pico_f1(gold, pred) == pytest.approx(2 / 3)


def test_pico_f1_matches_sklearn_on_random_corpora():
    for seed in range(300):
        rng = random.Random(seed)
        lengths = [rng.randint(0, 20) for _ in range(rng.randint(1, 6))] + [1]
        gold = [[rng.choice(PICO_TAGS) for _ in range(n)] for n in lengths]
        pred = [[rng.choice(PICO_TAGS) for _ in range(n)] for n in lengths]
        expected = sklearn_pico(gold, pred)
        assert pico_f1_per_class(gold, pred) == pytest.approx(expected, abs=1e-12)
        assert pico_f1(gold, pred) == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_pico_f1_class_absent_everywhere_is_zero():
    gold = pred = [["I-PAR", "O"]]
    assert pico_f1_per_class(gold, pred) == {"PAR": 1.0, "INT": 0.0, "OUT": 0.0}
    assert pico_f1(gold, pred) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- relation_f1

CHEMPROT = ["false", "CPR:3", "CPR:4", "CPR:5", "CPR:6", "CPR:9"]


def sklearn_relation(gold, pred, labels, negative):
    positives = [label for label in labels if label != negative]
    return sklearn_f1(gold, pred, labels=positives, average="micro", zero_division=0)


def test_relation_f1_hand_worked():
    gold = ["false", "CPR:3", "CPR:4", "CPR:4", "false"]
    pred = ["CPR:3", "CPR:3", "false", "CPR:9", "false"]
    # TP 1 (CPR:3); predicted positives 3; gold positives 3 -> P = R = F1 = 1/3
    assert relation_f1(gold, pred, "false") == pytest.approx(1 / 3)
    assert sklearn_relation(gold, pred, CHEMPROT, "false") == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("labels", "negative"),
    [(CHEMPROT, "false"), (["DDI-false", "DDI-mechanism", "DDI-effect"], "DDI-false"), ([0, 1], 0)],
)
def test_relation_f1_matches_sklearn(labels, negative):
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        skew = rng.dirichlet(np.ones(len(labels)))  # often mostly negative
        gold = list(rng.choice(np.array(labels, dtype=object), size=n, p=skew))
        pred = list(rng.choice(np.array(labels, dtype=object), size=n))
        assert relation_f1(gold, pred, negative) == pytest.approx(
            sklearn_relation(gold, pred, labels, negative), abs=1e-12
        )


def test_relation_f1_all_negative():
    assert relation_f1(["false"] * 4, ["false"] * 4, "false") == 0.0
    assert sklearn_relation(["false"] * 4, ["false"] * 4, CHEMPROT, "false") == 0.0
    # all-negative gold, some positive predictions: precision 0, recall undefined -> 0
    gold, pred = ["false"] * 3, ["CPR:3", "false", "false"]
    assert (
        relation_f1(gold, pred, "false") == 0.0 == sklearn_relation(gold, pred, CHEMPROT, "false")
    )


# ---------------------------------------------------------------- pearson, multilabel, accuracy


def test_pearson_matches_scipy():
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        gold = rng.uniform(0, 4, n)
        pred = gold * rng.normal(1, 0.5) + rng.normal(0, 1, n)
        assert pearson(gold, pred) == pytest.approx(pearsonr(gold, pred)[0], abs=1e-12)


def test_pearson_constant_is_zero():
    assert pearson([0.0, 1.0, 4.0], [2.5, 2.5, 2.5]) == 0.0
    assert pearson([2.0, 2.0, 2.0], [0.0, 1.0, 4.0]) == 0.0
    assert pearson([0.1] * 7, [0.1] * 7) == 0.0
    assert pearson([1.0], [3.0]) == 0.0


def test_multilabel_f1_matches_sklearn():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, k = int(rng.integers(1, 20)), 10
        gold = (rng.random((n, k)) < 0.2).astype(int)
        pred = (rng.random((n, k)) < 0.3).astype(int)
        expected = sklearn_f1(gold, pred, average="micro", zero_division=0)
        assert multilabel_f1(gold, pred) == pytest.approx(expected, abs=1e-12)
    assert multilabel_f1(np.zeros((3, 10)), np.zeros((3, 10))) == 0.0


def test_accuracy_matches_sklearn():
    rng = np.random.default_rng(4)
    for _ in range(100):
        n = int(rng.integers(1, 50))
        gold, pred = rng.choice(["yes", "no", "maybe"], n), rng.choice(["yes", "no", "maybe"], n)
        assert blurb_accuracy(gold, pred) == pytest.approx(accuracy_score(gold, pred), abs=1e-15)
    assert blurb_accuracy([], []) == 0.0


def test_metrics_registry_names_every_task_metric():
    from blurbtune.blurb import tasks

    assert {str(cfg.metric) for cfg in tasks().values()} == set(METRICS)


# ---------------------------------------------------------------- torchmetrics classes


def uneven_batches(n: int, seed: int = 0) -> list[slice]:
    rng = random.Random(seed)
    cuts = sorted({0, n, *rng.sample(range(1, n), min(4, n - 1))}) if n > 1 else [0, n]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


def test_entity_f1_metric_accumulates():
    for seed in range(50):
        gold, pred = random_corpus(seed)
        metric = build_metric("entity_f1")
        for part in uneven_batches(len(gold), seed):
            metric.update(pred[part], gold[part])
        value = metric.compute()
        assert value.dim() == 0 and value.is_floating_point()
        assert value.item() == pytest.approx(entity_f1(gold, pred), abs=1e-12)


def test_pico_f1_metric_accumulates():
    rng = random.Random(5)
    lengths = [rng.randint(0, 20) for _ in range(13)]
    gold = [[rng.choice(PICO_TAGS) for _ in range(n)] for n in lengths]
    pred = [[rng.choice(PICO_TAGS) for _ in range(n)] for n in lengths]
    metric = build_metric("pico_f1", labels=PICO_TAGS)
    for part in uneven_batches(len(gold)):
        metric.update(pred[part], gold[part])
    assert metric.compute().item() == pytest.approx(pico_f1(gold, pred), abs=1e-12)
    assert metric.compute_per_class() == pytest.approx(pico_f1_per_class(gold, pred))


def test_relation_f1_metric_accumulates():
    rng = np.random.default_rng(6)
    gold = rng.integers(0, 6, 97)
    pred = np.where(rng.random(97) < 0.6, gold, rng.integers(0, 6, 97))
    metric = build_metric("relation_f1", labels=CHEMPROT, negative_label="false")
    for part in uneven_batches(97):
        metric.update(torch.as_tensor(pred[part]), torch.as_tensor(gold[part]))
    named_gold, named_pred = [CHEMPROT[i] for i in gold], [CHEMPROT[i] for i in pred]
    expected = relation_f1(named_gold, named_pred, "false")
    assert metric.compute().item() == pytest.approx(expected, abs=1e-12)


def test_relation_f1_metric_uses_the_negative_labels_index():
    metric = build_metric(
        "relation_f1", labels=["DDI-mechanism", "DDI-false"], negative_label="DDI-false"
    )
    metric.update(torch.tensor([1, 0, 0]), torch.tensor([1, 0, 1]))
    # index 1 is negative: TP 1, predicted positives 2, gold positives 1 -> F1 2/3
    assert metric.compute().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        build_metric("relation_f1", labels=CHEMPROT, negative_label="CPR:1")


def test_accuracy_metric_accumulates():
    rng = np.random.default_rng(7)
    gold, pred = rng.integers(0, 3, 55), rng.integers(0, 3, 55)
    metric = build_metric("accuracy", labels=["yes", "no", "maybe"])
    for part in uneven_batches(55):
        metric.update(torch.as_tensor(pred[part]), torch.as_tensor(gold[part]))
    assert metric.compute().item() == pytest.approx(blurb_accuracy(gold, pred), abs=1e-15)


def test_pearson_metric_accumulates():
    rng = np.random.default_rng(8)
    gold = rng.uniform(0, 4, 23)
    pred = gold + rng.normal(0, 1, 23)
    metric = build_metric("pearson")
    for part in uneven_batches(23):
        metric.update(
            torch.tensor(pred[part], dtype=torch.float32),
            torch.tensor(gold[part], dtype=torch.float32),
        )
    expected = pearson(gold.astype(np.float32), pred.astype(np.float32))
    assert metric.compute().item() == pytest.approx(expected, abs=1e-9)


def test_pearson_metric_constant_is_zero():
    metric = build_metric("pearson")
    metric.update(torch.full((3,), 2.5), torch.tensor([0.0, 1.0, 4.0]))
    metric.update(torch.full((2,), 2.5), torch.tensor([2.0, 3.0]))
    assert metric.compute().item() == 0.0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert build_metric("pearson").compute().item() == 0.0


def test_multilabel_f1_metric_accumulates():
    rng = np.random.default_rng(9)
    gold = (rng.random((41, 10)) < 0.2).astype(np.int64)
    pred = (rng.random((41, 10)) < 0.3).astype(np.int64)
    metric = build_metric("multilabel_f1")
    for part in uneven_batches(41):
        metric.update(torch.as_tensor(pred[part]), torch.as_tensor(gold[part]))
    assert metric.compute().item() == pytest.approx(multilabel_f1(gold, pred), abs=1e-12)


def test_metric_reset_and_unknown_name():
    metric = build_metric("accuracy")
    metric.update(torch.tensor([1]), torch.tensor([1]))
    metric.reset()
    metric.update(torch.tensor([0]), torch.tensor([1]))
    assert metric.compute().item() == 0.0
    with pytest.raises(ValueError, match="valid"):
        build_metric("f1")


# ---------------------------------------------------------------- constant_baseline


def test_constant_baseline_classification():
    # majority of train is "yes"; eval has 1 yes in 4
    assert constant_baseline("accuracy", ["yes", "yes", "no"], ["yes", "no", "no", "no"]) == 0.25
    # majority "false" is the negative class: no positive predictions -> 0
    train = ["false", "false", "CPR:3"]
    assert constant_baseline("relation_f1", train, ["CPR:3", "false"], "false") == 0.0
    # GAD-like, majority positive "1": TP 2, predicted 4, gold 2 -> F1 2*2/(4+2) = 2/3
    assert constant_baseline("relation_f1", ["1", "1", "0"], ["1", "0", "1", "0"], "0") == (
        pytest.approx(2 / 3)
    )
    with pytest.raises(ValueError):
        constant_baseline("relation_f1", train, ["CPR:3"])


def test_constant_baseline_sequences_similarity_multilabel():
    tags = [["B-Disease", "I-Disease", "O"]]
    assert constant_baseline("entity_f1", tags, tags) == 0.0
    assert constant_baseline("pico_f1", [["I-PAR"]], [["I-PAR", "O"]]) == 0.0
    assert constant_baseline("pearson", [1.0, 3.0], [0.0, 2.0, 4.0]) == 0.0
    # label 0 is present in 2 of 3 train rows -> predict [1, 0] for every eval row
    # eval gold [[1,0],[1,1]]: TP 2, FP 0, FN 1 -> F1 4/5
    train = [[1, 0], [1, 0], [0, 1]]
    assert constant_baseline("multilabel_f1", train, [[1, 0], [1, 1]]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="valid"):
        constant_baseline("bleu", [], [])
