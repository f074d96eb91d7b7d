"""A sweep in which a run failed ends with a non-zero status, after running the rest.

A sweep goes on past a run that fails (an error while training, a folder that holds another
configuration's run, a bad setting): the other runs are worth having. Its exit status must
still say that something failed, or a script (or CI) takes the sweep for done. Hydra's sweepers
return the jobs' results to a process that then ignores them, and with `hydra/launcher=parallel`
or `slurm_gpu` the runs are in other processes, so each failed run appends a line to a file
that the launching process named at the sweep's start (in the sweep folder, which every job of
the sweep can write; passed to them in the environment, `FAILED_RUNS`). At the sweep's end
`SweepOutcome` prints `error: k runs of this sweep failed: ...` and exits 1.

A diverged run is a result, not a failure; a run skipped because another process holds its
folder, or because the sweep is stopping, is said in its own line and not counted.

`SweepOutcome.on_multirun_start` also checks the sweeper's own settings before Hydra builds
the sweeper (which would wrap a bad value in its own error): `hydra.sweeper.size`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from blurbtune.errors import ConfigError

FAILED_RUNS = "BLURBTUNE_FAILED_RUNS"  # the environment variable naming the file


def note(run: str, why: str) -> None:
    """Record that `run` of the sweep under way failed (no-op outside a sweep)."""
    path = os.environ.get(FAILED_RUNS)
    if not path:
        return
    line = f"{run}: {why}".replace("\n", " ")
    with open(path, "a", encoding="utf-8") as f:  # one short append per line: whole lines
        f.write(line + "\n")


SHOWN = 5  # failures named in the final line


def _short(line: str, limit: int = 200) -> str:
    return line if len(line) <= limit else line[:limit - 3] + "..."


def failed_runs(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError:
        return []


def _check_sweeper(config: Any) -> None:
    from blurbtune.settings import check_sweeper_size

    sweeper = config.hydra.sweeper
    if str(sweeper.get("_target_", "")).endswith("StackedSweeper"):
        check_sweeper_size(sweeper.get("size"))


class SweepOutcome(Callback):
    """Hydra callback (`hydra.callbacks` in train.yaml): see the module's docstring."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        try:
            _check_sweeper(config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f".failed-runs-{os.getpid()}"
        self.path.unlink(missing_ok=True)
        os.environ[FAILED_RUNS] = str(self.path.resolve())

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from blurbtune import stopping

        if self.path is None:
            return
        failed = failed_runs(self.path)
        self.path.unlink(missing_ok=True)
        os.environ.pop(FAILED_RUNS, None)
        if failed and stopping.requested() is None:  # a stopped sweep exits as stopping says
            runs = "run of this sweep" if len(failed) == 1 else "runs of this sweep"
            named = "; ".join(_short(line) for line in failed[:SHOWN])
            more = f"; and {len(failed) - SHOWN} more" if len(failed) > SHOWN else ""
            print(f"error: {len(failed)} {runs} failed, the others ran (each failure is said "
                  f"above): {named}{more}", file=sys.stderr)
            raise SystemExit(1)
