"""Same config and seed -> byte-identical predictions; seeds split by what they control."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import TASK_OF_TYPE, needs_fixtures, prediction_bytes, tiny_config

from blurbtune.reproducibility import EpochPermutation, enable_determinism, resolve_seeds
from blurbtune.run import build, run

pytestmark = needs_fixtures

METRICS = ("dev", "test", "history", "best_epoch", "baseline")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("task_type", sorted(TASK_OF_TYPE))
def test_same_seed_gives_identical_predictions_and_metrics(task_type, tmp_path, cache):
    task = TASK_OF_TYPE[task_type]
    results = []
    for name in ("a", "b"):
        run(tiny_config(tmp_path / name, cache, f"task={task}", "trainer.max_epochs=2"))
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    a, b = results
    assert a["status"] == b["status"] == "completed"
    assert a["task_type"] == task_type
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    pa, pb = prediction_bytes(tmp_path / "a"), prediction_bytes(tmp_path / "b")
    assert sorted(pa) == ["dev.jsonl", "test.jsonl", "test_last.jsonl"]
    assert pa == pb
    assert a["determinism"]["torch.use_deterministic_algorithms"] is True


def test_a_different_seed_changes_the_predictions(tmp_path, cache):
    """The identity check above can fail: the seed does reach the predictions."""
    for name, seed in (("a", 0), ("b", 1)):
        run(tiny_config(tmp_path / name, cache, f"seed={seed}", "trainer.max_epochs=2"))
    assert prediction_bytes(tmp_path / "a") != prediction_bytes(tmp_path / "b")


def _initial_state_and_order(cfg, seeds):
    _, dm, model, _ = build(cfg, seeds)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loader = dm.train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        orders.append([i for batch in loader for i in batch["example_idx"].tolist()])
    return state, orders


def test_data_seed_changes_the_order_but_not_the_initial_weights(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, "stabilizer=reinit_top")
    w0, order0 = _initial_state_and_order(cfg, resolve_seeds(0, None, None))
    w1, order1 = _initial_state_and_order(cfg, resolve_seeds(0, 7, None))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert order0 != order1
    for order in order0 + order1:
        assert sorted(order) == list(range(16))
    assert order0[0] != order0[1]  # a new order each epoch


def test_init_seed_changes_the_head_and_reinit_layers_but_not_the_order(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, "stabilizer=reinit_top")
    w0, order0 = _initial_state_and_order(cfg, resolve_seeds(0, None, None))
    w1, order1 = _initial_state_and_order(cfg, resolve_seeds(0, None, 7))
    assert order0 == order1
    assert not torch.equal(w0["classifier.weight"], w1["classifier.weight"])
    top = "bert.encoder.layer.3.attention.self.query.weight"  # re-initialised (top 1 of 4)
    assert not torch.equal(w0[top], w1[top])


def test_seed_zero_is_a_seed():
    assert resolve_seeds(0, None, None) == {"seed": 0, "data_seed": 0, "init_seed": 0}
    assert resolve_seeds(0, 3, None) == {"seed": 0, "data_seed": 3, "init_seed": 0}


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    a, b = EpochPermutation(50, seed=3), EpochPermutation(50, seed=3)
    a.set_epoch(2)
    list(a)  # consuming a pass changes nothing
    b.set_epoch(2)
    assert list(a) == list(b)
    b.skip(10)
    assert list(b) == list(a)[10:]
    assert list(b) == list(a)  # skip applies to one pass only


def test_determinism_flags_are_recorded_and_switch_off():
    try:
        off = enable_determinism(False)
        assert off["torch.use_deterministic_algorithms"] is False
        assert off["cudnn.benchmark"] is True
    finally:
        on = enable_determinism(True)
    assert on["torch.use_deterministic_algorithms"] is True
    assert on["cudnn.deterministic"] is True and on["cudnn.benchmark"] is False
    assert on["CUBLAS_WORKSPACE_CONFIG"]


def test_test_every_epoch_records_test_scores_without_changing_the_run(tmp_path, cache):
    """test_every_epoch adds each epoch's test score to the history and changes nothing else:
    the last epoch's recorded test score is the one the run's final test pass gives."""
    for name, flag in (("off", "false"), ("on", "true")):
        run(tiny_config(tmp_path / name, cache, "trainer.max_epochs=3", "task=hoc",
                        f"test_every_epoch={flag}"))
    off, on = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("off", "on"))
    assert [h.get("test") for h in off["history"]] == [None] * 3
    tests = [h.pop("test") for h in on["history"]]
    assert len(tests) == 3 and all(isinstance(t, float) for t in tests)
    assert {k: on[k] for k in METRICS} == {k: off[k] for k in METRICS}
    assert prediction_bytes(tmp_path / "on") == prediction_bytes(tmp_path / "off")
    assert tests[-1] == on["test"]["last"]
