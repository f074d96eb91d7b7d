"""Small in-process runs of the tiny model on the fixtures, shared by the reproducibility tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from blurbtune.config import compose

FIXTURES = Path(__file__).parent / "fixtures" / "blurb"
BAD = Path(__file__).parent / "fixtures" / "bad"
# Tiny models gain nothing from threads, and on a busy CI machine threads slow them tenfold.
torch.set_num_threads(1)

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="tests/fixtures/blurb absent")

# One dataset per task type.
TASK_OF_TYPE = {"ner": "ncbi_disease", "pico": "ebmnlp", "relation": "chemprot",
                "similarity": "biosses", "doc_classification": "hoc", "qa": "pubmedqa"}


def tiny_config(run_dir: Path, cache: Path, *overrides: str, data_dir: Path = FIXTURES):
    """The composed config of a small tiny-model run writing into `run_dir`."""
    return compose([
        "model=tiny", "task=biosses", f"data_dir={data_dir}", f"data.cache_dir={cache}",
        f"+run_dir='{run_dir}'", "trainer.max_epochs=1", "task.batch_size=4",
        "data.max_train_examples=16", "data.max_eval_examples=8",
        "+trainer.enable_progress_bar=false",
        *overrides])


def copy_task_folder(src_folder: str, dest_root: Path, replace: dict[str, Path] | None = None,
                     drop: tuple[str, ...] = ()) -> Path:
    """A data_dir holding a copy of one fixture folder, with files replaced or dropped."""
    dest = dest_root / src_folder
    shutil.copytree(FIXTURES / src_folder, dest)
    for name, source in (replace or {}).items():
        shutil.copyfile(source, dest / name)
    for name in drop:
        (dest / name).unlink()
    return dest_root


def prediction_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "predictions").glob("*.jsonl"))}


# What a resumed run shares with the run that was never stopped.
RESUME_COMPARED = ("dev", "test", "history", "best_epoch", "epochs_run", "collapsed")


def run_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """A resumed run completed with the uninterrupted run's results and prediction bytes."""
    a, b = run_results(resumed), run_results(uninterrupted)
    assert a["status"] == "completed"
    assert {k: a[k] for k in RESUME_COMPARED} == {k: b[k] for k in RESUME_COMPARED}
    assert prediction_bytes(resumed) == prediction_bytes(uninterrupted)
