"""Tests for what makes runs fast: length-grouped batches, the trainer presets, the matmul
precision hook, and a tokenizer fingerprint that tokenising does not change (cache hits)."""

from __future__ import annotations

import statistics

import datasets
import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from blurbtune.config import compose
from blurbtune.datamodule import LengthGroupedOrder
from blurbtune.models import package_path, tokenizer_fingerprint
from blurbtune.reproducibility import set_matmul_precision
from blurbtune.tasks.base import label_index


def _dataset(n: int = 400, seed: int = 0) -> tuple[datasets.Dataset, list[int]]:
    """Rows whose lengths vary widely (3 to 300 tokens), as in NER or QA."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 300, (n,), generator=gen).tolist()
    return datasets.Dataset.from_dict({"input_ids": [[1] * k for k in lengths]}), lengths


def _epochs(sampler, n: int) -> list[list[int]]:
    out = []
    for epoch in range(n):
        sampler.set_epoch(epoch)  # Lightning does this before each epoch
        out.append(list(sampler))
    return out


def length_grouped(lengths: list[int], batch_size: int, seed: int) -> LengthGroupedOrder:
    return LengthGroupedOrder(len(lengths), seed, lengths, batch_size)


def test_length_grouped_sampler_yields_every_index_once_per_epoch():
    _, lengths = _dataset(397)
    sampler = length_grouped(lengths, 16, 3)
    for order in _epochs(sampler, 3):
        assert sorted(order) == list(range(397))


def test_length_grouped_sampler_is_deterministic_per_seed_and_reshuffles_each_epoch():
    _, lengths = _dataset()
    a = _epochs(length_grouped(lengths, 16, 7), 2)
    b = _epochs(length_grouped(lengths, 16, 7), 2)
    c = _epochs(length_grouped(lengths, 16, 8), 2)
    assert a == b
    resumed = length_grouped(lengths, 16, 7)
    resumed.set_epoch(1)
    assert list(resumed) == a[1]  # an epoch's order depends on (seed, epoch) only
    assert a[0] != c[0]
    assert a[0] != a[1]


def test_length_grouped_batches_need_less_padding_than_random_batches():
    ds, lengths = _dataset()

    def padding(sampler) -> float:
        """Mean fraction of pad tokens when each batch is padded to its longest row."""
        fracs = []
        for batch in BatchSampler(sampler, 16, drop_last=False):
            lens = [lengths[i] for i in batch]
            fracs.append(1 - sum(lens) / (max(lens) * len(lens)))
        return statistics.mean(fracs)

    grouped = padding(length_grouped(lengths, 16, 0))
    shuffled = padding(RandomSampler(ds, generator=torch.Generator().manual_seed(0)))
    assert shuffled > 0.3  # lengths uniform in [3, 300): random batches are half padding
    # Pools of 4 batches of uniformly spread lengths: each batch spans a quarter of its
    # pool's range, which leaves about half of a random batch's padding (0.25 vs 0.45).
    assert grouped < shuffled * 0.6


def test_length_grouped_batches_come_from_small_random_pools():
    """Rows are sorted by length only within pools of LENGTH_GROUP_BATCHES batches drawn at
    random, so batches still mix rows from across the data set."""
    from blurbtune.datamodule import LENGTH_GROUP_BATCHES

    _, lengths = _dataset(640)
    order = list(length_grouped(lengths, 16, 0))
    pool = 16 * LENGTH_GROUP_BATCHES
    pools = [order[k:k + pool] for k in range(0, len(order), pool)]
    descending = [[lengths[i] for i in p] == sorted((lengths[i] for i in p), reverse=True)
                  for p in pools]
    assert sum(descending) >= len(pools) - 2  # the longest row is swapped into the first batch
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    assert order[0] == longest


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp"])
def test_trainer_presets_compose_and_override_only_what_differs(preset):
    default = compose(["model=tiny", "trainer=default"]).trainer
    cfg = compose(["model=tiny", f"trainer={preset}"]).trainer
    changed = {k for k in cfg if k not in default or cfg[k] != default[k]}
    expected = {"cpu": {"accelerator"},
                "gpu": {"accelerator", "precision", "matmul_precision"},
                "ddp": {"accelerator", "precision", "matmul_precision", "devices", "strategy"}}
    assert changed == expected[preset]
    if preset != "cpu":
        assert cfg.precision in ("bf16-mixed", "16-mixed")
        assert cfg.matmul_precision == "high"


def test_set_matmul_precision_sets_and_reports_torch_state():
    before = torch.get_float32_matmul_precision()
    try:
        flags = set_matmul_precision("high")
        assert torch.get_float32_matmul_precision() == "high"
        assert flags["float32_matmul_precision"] == "high"
        assert set_matmul_precision(None)["float32_matmul_precision"] == "high"
        with pytest.raises(ValueError, match="matmul_precision"):
            set_matmul_precision("fast")
    finally:
        torch.set_float32_matmul_precision(before)


def test_tokenizer_fingerprint_survives_tokenising():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(package_path("data", "tiny_tokenizer"))
    fresh = tokenizer_fingerprint(tok)
    tok(["a protein binds the receptor"], truncation=True, max_length=8, padding="max_length")
    assert tokenizer_fingerprint(tok) == fresh
    tok.add_tokens(["@GENE$"], special_tokens=True)
    assert tokenizer_fingerprint(tok) != fresh


def test_label_index_takes_a_plain_label_list():
    assert label_index(["O", "B-Disease", "I-Disease"], "I-Disease", "f.tsv", 3) == 2
    with pytest.raises(Exception, match="unknown label 'X'"):
        label_index(["O"], "X", "f.tsv", 3)
