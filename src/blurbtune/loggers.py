"""Lightning loggers chosen by the `logger` config group: csv (default), tensorboard, wandb,
mlflow, or several (`logger=[csv,tensorboard]`).

Each logger gets the resolved config and the seeds as hyperparameters, the dev metric per
epoch (the LightningModule logs it), and the final scores; a run is named after its folder
and a sweep's runs are grouped under the sweep's name (set in conf/logger/*.yaml).
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Constructor arguments left null in conf/logger/*.yaml that the run fills in.
RUN_FOLDER_ARGS = ("save_dir",)
RUN_NAME_ARGS = ("run_name", "name")


def build(cfg: DictConfig, out: Path, finish_open: bool = True,
          stacked: bool = False) -> list[Any]:
    """The loggers of `cfg.logger`, writing into (or named after) the run folder `out`.
    `finish_open`: end a W&B run a failed run of this process left open (not for the second
    and later members of a stack, whose first member's run is open on purpose). `stacked`: a
    member of a stack, whose W&B run must be its own while the others' are open too."""
    from hydra.utils import get_class, instantiate

    if finish_open:
        _finish_wandb_run()
    loggers = []
    for key, spec in (cfg.get("logger") or {}).items():
        if spec is None:
            continue
        params = inspect.signature(get_class(spec._target_)).parameters
        fill: dict[str, Any] = {}
        for arg in RUN_FOLDER_ARGS:
            if arg in params and arg in spec and spec[arg] is None:
                fill[arg] = str(out)
        for arg in RUN_NAME_ARGS:
            if arg in params and arg in spec and spec[arg] is None:
                fill[arg] = out.name
                break
        if stacked and key == "wandb":
            fill["reinit"] = "create_new"  # not the process's one current run: one per member
        uri = spec.get("tracking_uri")
        if isinstance(uri, str) and uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            logger = instantiate(spec, **fill)
        except ImportError as e:
            from blurbtune.errors import ConfigError

            raise ConfigError(f"logger={key} needs a package that is not installed ({e}); "
                              f"pip install 'blurbtune[{key}]'") from None
        loggers.append(logger)
        if key == "csv":
            _open_csv(logger)
    return loggers


def for_member(logger: Any, k: int) -> Any:
    """`logger` seeing only member k's metrics of a stack (logged as `m<k>/<name>`, passed on
    as `<name>`, so its files read as a single run's); metrics of no member pass unchanged."""
    from pytorch_lightning.loggers.logger import Logger

    prefix = f"m{k}/"

    class MemberLogger(Logger):
        @property
        def name(self) -> Any:
            return logger.name

        @property
        def version(self) -> Any:
            return logger.version

        @property
        def save_dir(self) -> Any:
            return logger.save_dir

        @property
        def log_dir(self) -> Any:
            return getattr(logger, "log_dir", None)

        @property
        def experiment(self) -> Any:
            return logger.experiment

        def log_metrics(self, metrics: dict, step: int | None = None) -> None:
            own = {key.removeprefix(prefix): value for key, value in metrics.items()
                   if key.startswith(prefix) or not MEMBER_KEY.match(key)}
            if own:
                logger.log_metrics(own, step)

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            logger.log_hyperparams(params, *args, **kwargs)

        def save(self) -> None:
            logger.save()

        def finalize(self, status: str) -> None:
            logger.finalize(status)

    return MemberLogger()


MEMBER_KEY = re.compile(r"m\d+/")


def _open_csv(logger: Any) -> None:
    """Create the CSV writer now. Lightning warns that the run folder 'exists and is not empty'
    and deletes an old metrics.csv; the folder of a new run holds the run's own files, so the
    warning is shown only when there is a metrics.csv to delete (a rerun)."""
    stale = (Path(logger.log_dir) / "metrics.csv").exists()
    with warnings.catch_warnings():
        if not stale:
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists "
                                                      r"and is not empty")
        logger.experiment  # noqa: B018 - the property creates the writer


def hyperparameters(cfg: DictConfig, extra: dict) -> dict:
    """The resolved run config (without Hydra's own node) plus `extra` (seeds, threads)."""
    container = {key: OmegaConf.to_container(value, resolve=True)
                 if OmegaConf.is_config(value) else value
                 for key, value in cfg.items() if key != "hydra"}
    return {**container, **extra}


def log_start(loggers: list[Any], cfg: DictConfig, extra: dict) -> dict:
    """Log the hyperparameters (resolved config, seeds, threads); return them for `log_final`."""
    params = hyperparameters(cfg, extra)
    for logger in loggers:
        logger.log_hyperparams(params)
    return params


def log_final(loggers: list[Any], results: dict, step: int, params: dict) -> None:
    """The final scores (dev best, test of the best-on-dev and of the last weights).

    A logger whose `log_hyperparams` takes metrics (TensorBoard) gets them with the
    hyperparameters, so that its hparams view pairs each run's settings with its scores.
    """
    metric = results["metric"]
    scores = {f"final/dev_{metric}_best": results["dev"]["best"],
              f"final/test_{metric}_best": results["test"]["best"],
              f"final/test_{metric}_last": results["test"]["last"]}
    for logger in loggers:
        if "metrics" in inspect.signature(logger.log_hyperparams).parameters:
            logger.log_hyperparams(params, metrics=scores)
        else:
            logger.log_metrics(scores, step=step)
        logger.save()
        logger.finalize("success")
        _end_own_wandb_run(logger)
    _finish_wandb_run()


def finish(loggers: list[Any]) -> None:
    """Close the loggers of a run that ends without final scores (a diverged stack member)."""
    for logger in loggers:
        logger.save()
        logger.finalize("failed")
        _end_own_wandb_run(logger)


def _end_own_wandb_run(logger: Any) -> None:
    """Lightning's W&B logger leaves its run open; a stack member's is not the process's
    current run, which `_finish_wandb_run` ends, so it is ended here."""
    if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None):
        logger._experiment.finish()


def _finish_wandb_run() -> None:
    wandb = sys.modules.get("wandb")  # only if a logger of this process imported it
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
