"""A damaged tokenised cache is named in one warning, removed and rebuilt from the data: the run
goes on, and so does every later run that shares the cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tiny_runs import FIXTURES, needs_fixtures

from blurbtune.config import compose
from blurbtune.data import read_split
from blurbtune.datamodule import encode_split
from blurbtune.models import load_tokenizer

pytestmark = needs_fixtures


@pytest.fixture(scope="module")
def setup():
    cfg = compose(["model=tiny", "task=ncbi_disease"])  # tagging: rows are windows of examples
    return load_tokenizer(cfg.model, cfg.task), cfg.task


def encode(setup, cache: Path):
    tokenizer, task = setup
    return encode_split(read_split(task, FIXTURES, "train"), tokenizer, task, cache)


def cached_folder(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return folder


def rows(ds) -> dict:
    return ds.with_format(None).to_dict()


def test_a_truncated_arrow_file_is_rebuilt_with_a_warning(setup, tmp_path, caplog):
    """It raised `OSError: Expected to be able to read ... bytes`, naming no folder, on this
    run and on every later run using the cache."""
    fresh, from_cache = encode(setup, tmp_path / "cache")
    assert not from_cache
    expected = rows(fresh)
    folder = cached_folder(tmp_path / "cache")
    (arrow,) = folder.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="blurbtune"):
        rebuilt, from_cache = encode(setup, tmp_path / "cache")
    assert not from_cache and rows(rebuilt) == expected
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith(f"tokenised cache {folder} is damaged (")
    assert line.endswith("): removed it; tokenising again from the data")
    again, from_cache = encode(setup, tmp_path / "cache")  # the next run: a sound cache
    assert from_cache and rows(again) == expected
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]


def test_a_cache_that_loads_but_lacks_examples_is_rebuilt(setup, tmp_path, caplog):
    """A file cut at a record boundary, or another run's rows: it loaded without a word and
    the run trained and scored on part of its split."""
    fresh, _ = encode(setup, tmp_path / "cache")
    folder = cached_folder(tmp_path / "cache")
    part = fresh.select(range(len(fresh) // 2))
    part.save_to_disk(str(tmp_path / "part"))
    for name in ("dataset_info.json", "state.json"):
        (folder / name).write_bytes((tmp_path / "part" / name).read_bytes())
    for old in folder.glob("*.arrow"):
        old.unlink()
    for new in (tmp_path / "part").glob("*.arrow"):
        (folder / new.name).write_bytes(new.read_bytes())
    with caplog.at_level(logging.WARNING, logger="blurbtune"):
        rebuilt, from_cache = encode(setup, tmp_path / "cache")
    assert not from_cache and rows(rebuilt) == rows(fresh)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"tokenised cache {folder} is damaged (its rows cover" in line


def test_a_folder_left_half_written_is_rebuilt(setup, tmp_path, caplog):
    fresh, _ = encode(setup, tmp_path / "cache")
    folder = cached_folder(tmp_path / "cache")
    (folder / "dataset_info.json").unlink()
    with caplog.at_level(logging.WARNING, logger="blurbtune"):
        rebuilt, from_cache = encode(setup, tmp_path / "cache")
    assert not from_cache and rows(rebuilt) == rows(fresh)
    assert any(str(folder) in r.getMessage() for r in caplog.records)


def test_a_cache_that_cannot_be_saved_is_skipped_with_a_warning(setup, tmp_path, caplog,
                                                                monkeypatch):
    """A full disk or a read-only cache folder: the split is used from memory."""
    import errno

    import datasets

    expected = rows(encode(setup, None)[0])

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    (tmp_path / "cache").mkdir()
    with caplog.at_level(logging.WARNING, logger="blurbtune"):
        ds, from_cache = encode(setup, tmp_path / "cache")
    assert not from_cache and rows(ds) == expected
    assert list((tmp_path / "cache").iterdir()) == []
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith("could not save the tokenised cache ")
    assert line.endswith("(OSError: [Errno 28] No space left on device): going on without it")
