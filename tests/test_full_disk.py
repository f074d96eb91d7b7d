"""A full disk at any write a run or a report makes ends in one line, on a real full file system.

Each case mounts a 64 MB tmpfs (skipped where mounting is not permitted), puts the run (or the
report) folder on it, and fills it to the last byte just before one write: the write then fails
as the writing library fails on a full disk (torch's zip writer, safetensors, the CSV logger,
logging, matplotlib...). The command must end in the one-line error with exit status 2 and no
traceback, leave no temporary file, and, once the space is freed, the same command finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

pytestmark = pytest.mark.slow

# In the command's process: fill the tmpfs just before the named write, then run the command.
RUNNER = textwrap.dedent('''
    import os, sys

    def fill():
        fd = os.open(os.path.join(os.environ["TMPFS"], "filler"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, bytes(1 << 16))
        except OSError:
            pass
        try:
            while True:
                os.write(fd, b"x")
        except OSError:
            pass
        os.close(fd)

    def before(owner, name, when=lambda *a, **k: True):
        real = getattr(owner, name)
        def filled(*args, **kwargs):
            if when(*args, **kwargs):
                fill()
            return real(*args, **kwargs)
        setattr(owner, name, filled)

    at = os.environ["FILL_AT"]
    if at == "checkpoint":
        from blurbtune import checkpoints
        before(checkpoints.RunCheckpointIO, "save_checkpoint")
    elif at == "model":
        import transformers
        before(transformers.PreTrainedModel, "save_pretrained")
    elif at == "predictions":
        from blurbtune import run
        before(run, "_write_predictions")
    elif at == "results":
        from blurbtune import run
        before(run, "write_json", lambda path, obj: obj.get("status") == "completed")
    elif at == "metrics":
        from lightning_fabric.loggers import csv_logs
        before(csv_logs._ExperimentWriter, "save")
    elif at == "log":
        import logging
        before(logging.FileHandler, "emit",
               lambda self, record: record.name.startswith("pytorch_lightning"))
    elif at == "report":
        from matplotlib.figure import Figure
        before(Figure, "savefig")
    if at == "report":
        from blurbtune.report.cli import main
        sys.exit(main(sys.argv[1:]))
    sys.argv = ["train.py", *sys.argv[1:]]
    from blurbtune.train import main
    main()
''')


@pytest.fixture
def tmpfs(tmp_path):
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def _command(tmp_path: Path, tmpfs: Path, at: str, *args: str) -> subprocess.CompletedProcess:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "TMPFS": str(tmpfs), "FILL_AT": at,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(runner), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)


def _ends_in_one_line(done: subprocess.CompletedProcess, where: Path) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "No space left on device" in last and str(where) in last, done.stderr
    assert not [p for p in where.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.parts]


@pytest.mark.parametrize("at", ["checkpoint", "model", "predictions", "results", "metrics",
                                "log"])
def test_a_full_disk_at_any_write_of_a_run_is_one_line_and_the_rerun_finishes(
        tmp_path, tmpfs, at):
    if not (FIXTURES / "BIOSSES").is_dir():
        pytest.skip("tests/fixtures/blurb absent")
    run_dir = tmpfs / "run"
    args = ["model=tiny", "task=biosses", f"data_dir={FIXTURES}",
            f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "task.batch_size=8",
            "data.max_train_examples=16", "data.max_eval_examples=8", "save_model=true",
            "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    done = _command(tmp_path, tmpfs, at, *args)
    _ends_in_one_line(done, tmpfs)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] in ("running", "failed")  # what it could record: never "completed"

    (tmpfs / "filler").unlink()
    again = _command(tmp_path, tmpfs, "nowhere", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


def test_a_full_disk_while_a_report_is_written_is_one_line(tmp_path, tmpfs):
    from report_runs import write_run

    runs = tmp_path / "runs"
    for stabilizer in ("none", "llrd"):
        for seed in range(3):
            score = 0.5 + 0.01 * seed + (0.1 if stabilizer == "llrd" else 0.0)
            write_run(runs, task="biosses", stabilizer=stabilizer, seed=seed,
                      test=(score, score), dev=(score, score))
    done = _command(tmp_path, tmpfs, "report", str(runs), "--out", str(tmpfs / "report"))
    _ends_in_one_line(done, tmpfs)
    assert not (tmpfs / "report").exists()
