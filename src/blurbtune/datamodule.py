"""Lightning DataModule: tokenised splits cached on disk, dynamically padded batches."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import multiprocessing as mp
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding
from transformers.trainer_pt_utils import get_length_grouped_indices

from blurbtune import __version__
from blurbtune.console import datasets_bars_off
from blurbtune.data import SPLITS, Split, read_splits
from blurbtune.errors import ConfigError
from blurbtune.models import tokenizer_fingerprint
from blurbtune.reproducibility import EpochPermutation, derived_seed, seed_worker
from blurbtune.tasks import task_type

META = ("example_idx", "word_offset")
log = logging.getLogger("blurbtune")


def encode_split(split: Split, tokenizer: Any, task: Any, cache_dir: Path | None,
                 fingerprint: str | None = None) -> tuple[datasets.Dataset, bool]:
    """Tokenise one split, or load it from the cache keyed on data, tokenizer, task and length.

    `fingerprint` is `tokenizer_fingerprint(tokenizer)`, when the caller has it already.
    Returns the dataset and whether it came from the cache.
    """
    kind = task_type(task.type)
    examples = split.examples
    key = hashlib.sha256(json.dumps({
        "data": split.sha256, "tokenizer": fingerprint or tokenizer_fingerprint(tokenizer),
        "task": task.name, "type": task.type, "max_length": int(task.max_length),
        "labels": list(task.labels) if task.get("labels") is not None else None,
        "n": len(examples), "blurbtune": __version__, "code": _encoder_code_hash(kind),
    }, sort_keys=True).encode()).hexdigest()[:20]
    target = cache_dir / f"{task.name}-{split.name}-{key}" if cache_dir else None
    cached = load_cached(target, len(examples)) if target is not None else None
    if cached is not None:
        return cached, True
    columns = {k: [ex.get(k) for ex in examples] for k in examples[0]}
    columns["example_idx"] = list(range(len(examples)))
    raw = datasets.Dataset.from_dict(columns)
    enc = raw.map(kind.encode, batched=True, remove_columns=raw.column_names,
                  fn_kwargs={"tokenizer": tokenizer, "task": task},
                  desc=f"Tokenising {task.name}/{split.name}")
    if target is None:
        return enc, False
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        with datasets_bars_off():  # the tokenising bar said it; a saving bar adds nothing
            enc.save_to_disk(str(tmp))
    except OSError as e:  # a full disk, a read-only cache: this run goes on without it
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not save the tokenised cache %s (%s): going on without it",
                    target, " ".join(f"{type(e).__name__}: {e}".split()))
        return enc, False
    try:
        tmp.rename(target)
    except OSError:  # another run of the sweep saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    saved = load_cached(target, len(examples))
    return (enc if saved is None else saved), False


# What a damaged cache folder raises on loading: a truncated or missing file (OSError, pyarrow's
# IOError), a cut JSON or arrow stream (ValueError, pyarrow's ArrowInvalid), missing keys.
DAMAGED = (OSError, ValueError, KeyError, TypeError, pa.ArrowException)


def load_cached(target: Path, n_examples: int) -> datasets.Dataset | None:
    """The tokenised split saved in `target`, or None when there is none.

    A folder that does not load, or whose rows do not cover each of the split's `n_examples`
    examples (a stream cut at a record boundary loads without a word), is damaged: a warning
    names it and it is removed, so that this run and the next ones tokenise again.
    """
    if not target.exists():
        return None
    try:
        ds = datasets.load_from_disk(str(target))
        problem = _incomplete(ds, n_examples)
    except DAMAGED as e:
        problem = " ".join(f"{type(e).__name__}: {e}".split())  # one line
    if not problem:
        return ds
    log.warning("tokenised cache %s is damaged (%s): removed it; tokenising again from the data",
                target, problem)
    aside = target.with_name(f".{target.name}.damaged-{uuid.uuid4().hex[:8]}")
    try:
        target.rename(aside)  # at once, for the other runs of a sweep reading this cache
    except FileNotFoundError:  # another run set it aside first
        return None
    shutil.rmtree(aside, ignore_errors=True)
    return None


def _incomplete(ds: datasets.Dataset, n_examples: int) -> str:
    """Why the rows of a loaded cache are not those of a split of `n_examples` ("" if they are)."""
    missing = [c for c in ("input_ids", "labels", "example_idx") if c not in ds.column_names]
    if missing:
        return f"no column {missing}"
    covered = set(ds.with_format(None)["example_idx"])
    if covered != set(range(n_examples)):
        return f"its rows cover {len(covered)} of the split's {n_examples} examples"
    return ""


def _encoder_code_hash(kind: Any) -> str:
    """Hash of the source of the task type's encoder, so a code change invalidates the cache."""
    src = "".join(inspect.getsource(cls) for cls in type(kind).__mro__ if cls is not object)
    return hashlib.sha256(src.encode()).hexdigest()[:12]


PADDING_TO_GROUP = 0.25  # "auto" groups lengths when random batches would be more padding


def resolve_group_by_length(value: bool | str, lengths: list[int], batch_size: int,
                            seed: int) -> bool:
    """`data.group_by_length`: true, false, or "auto": on when batches in random order would be
    more than a quarter padding (NER, relation and QA sentences) and the training set is large
    enough to pool more than one batch (see `pool_batches`)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() != "auto":
        raise ConfigError(f"data.group_by_length={value!r}: expected true, false or auto")
    return pool_batches(len(lengths), batch_size) > 1 and padding_fraction(
        lengths, EpochPermutation(len(lengths), seed).order(0), batch_size) > PADDING_TO_GROUP


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of pad tokens when `order` is cut into batches, each padded to its longest row."""
    fed = sum(len(b) * max(lengths[i] for i in b)
              for b in (order[k:k + batch_size] for k in range(0, len(order), batch_size)))
    return 1 - sum(lengths) / fed if fed else 0.0


def _lengths(ds: datasets.Dataset) -> list[int]:
    return [len(ids) for ids in ds["input_ids"]]


# Rows are drawn at random into pools of this many batches; each pool is sorted by length and
# cut into batches. The Trainer's sampler pools up to 50 batches (nearly sorted batches): on
# NCBI-disease that fed 2x fewer tokens but cost 1.9 test F1 points over 3 seeds, while pools
# of 4 fed 1.55x fewer and kept the scores of random batches (docs/benchmark.md). As in the
# Trainer's sampler, an epoch holds at least 4 pools, so that a small training set is not
# sorted whole into the same batches every epoch.
LENGTH_GROUP_BATCHES = 4


def pool_batches(n_rows: int, batch_size: int) -> int:
    """Batches per length-sorted pool: LENGTH_GROUP_BATCHES, fewer where an epoch would hold
    fewer than 4 pools (1: batches as drawn, nothing sorted)."""
    return max(1, min(n_rows // (4 * batch_size), LENGTH_GROUP_BATCHES))


class LengthGroupedOrder(EpochPermutation):
    """Random order with similar lengths batched together (less padding), still a function of
    (data_seed, epoch) only, so a resumed epoch replays it exactly. The longest row comes in
    the first batch, so a batch too long for memory fails at once."""

    def __init__(self, n: int, seed: int, lengths: list[int], batch_size: int) -> None:
        super().__init__(n, seed)
        self.lengths, self.batch_size = lengths, batch_size

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        return list(get_length_grouped_indices(self.lengths, self.batch_size,
                                               mega_batch_mult=pool_batches(
                                                   len(self.lengths), self.batch_size),
                                               generator=gen))


class Collator:
    """Pads to the longest sequence in the batch; carries the bookkeeping columns along."""

    def __init__(self, tokenizer: Any, head: str) -> None:
        self.inner = (DataCollatorForTokenClassification(tokenizer) if head == "token"
                      else DataCollatorWithPadding(tokenizer))

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        meta = {k: torch.tensor([f.pop(k) for f in features]) for k in META if k in features[0]}
        batch = dict(self.inner(features))
        batch.update(meta)
        return batch


class StackedBatches(Sampler[list[int]]):
    """The training batches of a stack: at each step, every member's own next batch (from its
    own order, as its single run would take it), as one flat list of row indices, member 0's
    rows first. `StackCollator` cuts it back into the members' batches."""

    def __init__(self, orders: list[EpochPermutation], batch_size: int) -> None:
        self.orders, self.batch_size = orders, batch_size
        self.sampler = self  # where Lightning looks for set_epoch on a batch sampler

    def set_epoch(self, epoch: int) -> None:
        for order in self.orders:
            order.set_epoch(epoch)

    def __iter__(self):
        members = [list(order) for order in self.orders]
        for start in range(0, len(members[0]), self.batch_size):
            yield [i for rows in members for i in rows[start:start + self.batch_size]]

    def __len__(self) -> int:
        return -(-len(self.orders[0]) // self.batch_size)


# Columns of a batch that run along the tokens, and what pads them (None: the tokenizer's pad
# id); labels run along the tokens for token-level heads only.
SEQUENCE_COLUMNS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}


class StackCollator:
    """Collates each member's rows as its single run would (padded to that member's longest
    row), then pads every member to one length (`stacking.stack_length`) and stacks them:
    tensors of shape [members, batch, ...]."""

    def __init__(self, collator: Collator, members: int, pad_id: int, head: str,
                 avoid: set[int]) -> None:
        self.collator, self.members, self.head, self.avoid = collator, members, head, avoid
        self.pads = {**SEQUENCE_COLUMNS, "input_ids": pad_id}
        if head == "token":
            self.pads["labels"] = -100

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        from blurbtune.stacking import stack_length

        rows = len(features) // self.members
        batches = [self.collator(features[k * rows:(k + 1) * rows]) for k in range(self.members)]
        length = stack_length([b["input_ids"].shape[1] for b in batches], self.avoid | {rows})
        out = {}
        for key in batches[0]:
            parts = [b[key] for b in batches]
            if key in self.pads:
                parts = [torch.nn.functional.pad(t, (0, length - t.shape[1]),
                                                 value=self.pads[key]) for t in parts]
            out[key] = torch.stack(parts)
        return out


def worker_context(num_workers: int) -> str | None:
    """Start method for DataLoader workers: the platform's own (None: torch's default).

    Inside a joblib worker (`hydra/launcher=joblib`) the default context is loky's, which
    cannot start DataLoader workers; name the platform's method explicitly there.
    """
    if num_workers == 0 or mp.get_start_method(allow_none=True) in mp.get_all_start_methods():
        return None
    return mp.get_all_start_methods()[0]


class BlurbDataModule(pl.LightningDataModule):
    """Reads the task's splits, tokenises them once (cached), and serves padded batches."""

    def __init__(self, task: Any, tokenizer: Any, data_dir: str, batch_size: int,
                 eval_batch_size: int, cache_dir: str | None = None, num_workers: int = 0,
                 data_seed: int = 0, max_train_examples: int | None = None,
                 max_eval_examples: int | None = None,
                 group_by_length: bool | str = "auto",
                 stack_data_seeds: list[int] | None = None,
                 avoid_lengths: set[int] | None = None) -> None:
        super().__init__()
        self.task, self.tokenizer, self.data_dir = task, tokenizer, data_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.num_workers, self.data_seed = num_workers, data_seed
        self.limits = {"train": max_train_examples, "dev": max_eval_examples,
                       "test": max_eval_examples}
        self.kind = task_type(task.type)
        if not isinstance(group_by_length, bool) and str(group_by_length).lower() != "auto":
            raise ConfigError(f"data.group_by_length={group_by_length!r}: expected true, "
                              "false or auto")
        self.group_by_length_setting = group_by_length
        self.group_by_length: bool | None = None  # resolved by prepare(), from the lengths
        # A stack: each member's data_seed, and what group_by_length resolved to for each.
        self.stack_data_seeds = list(stack_data_seeds) if stack_data_seeds else None
        self.stack_grouping: list[bool] = []
        self.avoid_lengths = set(avoid_lengths or ())
        self.splits: dict[str, Split] = {}
        self.encoded: dict[str, datasets.Dataset] = {}
        self.timing: dict[str, float] = {}
        self.from_cache: dict[str, bool] = {}
        self.tokenizer_fingerprint: str | None = None  # of the tokenizer the splits came from
        self.lengths: dict[str, list[int]] = {}  # token count of each row, per split
        self.train_sampler: EpochPermutation | None = None
        self._resume_skip = 0

    def prepare(self) -> None:
        """Read and tokenise every split (idempotent); called before training starts."""
        if self.encoded:
            return
        t0 = time.perf_counter()
        self.splits = read_splits(self.task, self.data_dir)
        for name in SPLITS:
            limit = self.limits[name]
            if limit:
                self.splits[name].examples = self.splits[name].examples[:limit]
        self.timing["read_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.cache_dir:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"data.cache_dir={str(self.cache_dir)!r}: cannot be a folder "
                                  f"({e.strerror or e}); expected a folder for the tokenised "
                                  "splits, or null for none") from None
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        for name, split in self.splits.items():
            self.encoded[name], self.from_cache[name] = encode_split(
                split, self.tokenizer, self.task, self.cache_dir, self.tokenizer_fingerprint)
        self.timing["tokenise_s"] = time.perf_counter() - t0
        self.lengths = {name: _lengths(ds.with_format(None)) for name, ds in self.encoded.items()}
        self.group_by_length = resolve_group_by_length(
            self.group_by_length_setting, self.lengths["train"], self.batch_size, self.data_seed)
        self.stack_grouping = [
            resolve_group_by_length(self.group_by_length_setting, self.lengths["train"],
                                    self.batch_size, seed)
            for seed in self.stack_data_seeds or ()]

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def examples(self, split: str) -> list[dict]:
        return self.splits[split].examples

    def _order(self, seed: int, grouped: bool) -> EpochPermutation:
        """A member's training order: a function of (data_seed, epoch) only, so a resumed
        epoch replays it exactly."""
        n = len(self.encoded["train"])
        order = (LengthGroupedOrder(n, seed, self.lengths["train"], self.batch_size) if grouped
                 else EpochPermutation(n, seed))
        order.skip(self._resume_skip)
        return order

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.encoded[split].with_format(None)
        if train and self.stack_data_seeds:
            orders = [self._order(seed, grouped) for seed, grouped
                      in zip(self.stack_data_seeds, self.stack_grouping, strict=True)]
            self._resume_skip = 0
            self.train_sampler = StackedBatches(orders, self.batch_size)
            collate = StackCollator(Collator(self.tokenizer, self.kind.head), len(orders),
                                    self.tokenizer.pad_token_id or 0, self.kind.head,
                                    self.avoid_lengths)
            return DataLoader(ds, batch_sampler=self.train_sampler, collate_fn=collate,
                              num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0,
                              worker_init_fn=seed_worker,
                              generator=torch.Generator().manual_seed(int(self.data_seed)),
                              multiprocessing_context=worker_context(self.num_workers))
        if train:
            self.train_sampler = self._order(self.data_seed, bool(self.group_by_length))
            self._resume_skip = 0
            sampler = self.train_sampler
        else:
            # Longest first, so that each batch pads little; the rows carry example_idx and
            # are scored in input order whatever order they were computed in.
            lengths = self.lengths[split]
            sampler = sorted(range(len(ds)), key=lambda i: -lengths[i])
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler, collate_fn=Collator(self.tokenizer, self.kind.head),
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          worker_init_fn=seed_worker,
                          generator=torch.Generator().manual_seed(int(self.data_seed)),
                          multiprocessing_context=worker_context(self.num_workers))

    def resume_at(self, batches_done: int) -> None:
        """Make the next training pass skip the batches an interrupted run already trained on."""
        self._resume_skip = int(batches_done) * self.batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
