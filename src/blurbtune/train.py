"""`python train.py ...` / `blurbtune train ...`: the Hydra entry point of one run or a sweep."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from blurbtune.config import register_resolvers
from blurbtune.errors import BlurbtuneError

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _main(cfg: DictConfig) -> float:
    from blurbtune.run import run

    try:
        return run(cfg)
    except BlurbtuneError as e:  # only a single run re-raises; Hydra would print a traceback
        _fail(e)


def _fail(e: BlurbtuneError) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Run Hydra; bad input ends with a one-line error and exit status 2."""
    try:
        _main()
    except BlurbtuneError as e:
        _fail(e)
