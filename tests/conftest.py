"""Shared test helpers: composing the real config, shrunk for a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "blurb"
SHARED = ROOT.parent / "shared" / "blurb"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only contend (see threads.py)

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/blurb is not present")


@pytest.fixture
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "token-cache"


def smoke_overrides(task: str, cache: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run of `task` on the fixtures with the tiny model."""
    return [
        "experiment=smoke", f"task={task}", f"data_dir={FIXTURES}", f"data.cache_dir={cache}",
        *extra,
    ]
