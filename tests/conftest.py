"""Shared test helpers: composing the real config, shrunk for a 2-core CPU."""

from __future__ import annotations

import os
import re
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


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def visible_lines(raw: str) -> list[str]:
    """What a terminal shows of captured output: each line's last carriage-return frame
    (progress bars redraw with \\r), escape sequences removed, blank lines dropped."""
    lines = []
    for line in raw.split("\n"):
        frames = [f for f in line.split("\r") if f.strip()]
        if frames:
            lines.append(ANSI.sub("", frames[-1]).rstrip())
    return [line for line in lines if line.strip()]
