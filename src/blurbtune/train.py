"""`python train.py ...` / `blurbtune train ...`: the Hydra entry point of one run or a sweep."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from blurbtune import sweep_outcome
from blurbtune.config import check_overrides, register_resolvers
from blurbtune.errors import BlurbtuneError, ConfigError
from blurbtune.io import FULL
from blurbtune.settings import check_settings
from blurbtune.threads import set_wait_policy

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _main(cfg: DictConfig) -> float | None:
    """The run's best dev score, for sweepers; None when the run failed or trained nothing.

    None rather than NaN: the optuna sweeper marks a trial that returns None as failed, while
    a NaN makes optuna 2.x raise inside the sweeper and end the whole search.
    """
    try:
        check_overrides(_task_overrides())
    except BlurbtuneError as e:
        _fail(e)
    try:
        check_settings(cfg)
    except ConfigError as e:  # one job of a sweep: say so, and let the sweep go on
        if not _in_multirun():
            _fail(e)
        print(f"error: {e} (run not started; the sweep goes on)", file=sys.stderr)
        sweep_outcome.note(_job_name(), str(e))
        return None
    try:
        from blurbtune.run import run  # torch, transformers, Lightning: only once a run starts

        score = run(cfg)
    except BlurbtuneError as e:  # only a single run re-raises; Hydra would print a traceback
        _fail(e)
    except OSError as e:
        if e.errno not in FULL:
            raise
        _fail(f"{e.filename or 'a file of the run'}: {e.strerror} (errno {e.errno}); what the "
              "run had done is recorded where it could be: free some space and run the same "
              "command again (it resumes from its last checkpoint)")
    return None if math.isnan(score) else score


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _job_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir).name


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _fail(e: BlurbtuneError | str) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Run Hydra; bad input ends with a one-line error and exit status 2."""
    set_wait_policy()  # before torch starts OpenMP
    try:
        _main()
    except BlurbtuneError as e:
        _fail(e)
