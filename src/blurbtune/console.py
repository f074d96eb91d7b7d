"""What a run prints: blurbtune's own lines and progress bars, not the libraries' chatter.

A plain run prints the parameter-group table, one progress bar per epoch (`epoch k/N`, with
the training loss and the dev metric on the bar's line), the labelled test bars, the summary
line and the run folder. The libraries' messages meant for their authors are switched off with
the libraries' own switches, each as narrowly as it can be:

- INFO records of other libraries (Lightning's device lines and litlogger tip): kept out of the
  console by `ConsoleFilter` in conf/hydra/job_logging/blurbtune.yaml; they still go to the run's
  `train.log`. Warnings and errors still reach the console.
- huggingface_hub's warnings, printed twice (its own handler, then the root's): propagation off.
- torch's `_pytree` deprecation raised inside Lightning: a warnings filter on that message from
  that module.
- Lightning's `log_every_n_steps` advice when an epoch has fewer batches than the interval
  (BIOSSES: 4): a warnings filter on that message; the metrics logger still writes every
  `log_every_n_steps`-th step of the run.
- transformers' weight-loading bar and LOAD REPORT: see `blurbtune.models` (the report is shown
  when a key of the encoder is missing or unexpected).

Importing this module is cheap (the logging config names its classes before anything is built).
"""

from __future__ import annotations

import logging
import statistics
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blurbtune.io import FULL

OWN_LOGGERS = ("blurbtune", "__main__")


def _own(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OWN_LOGGERS


class ConsoleFilter(logging.Filter):
    """Lets through blurbtune's records and every library's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _own(record) or record.levelno >= logging.WARNING


class ConsoleFormatter(logging.Formatter):
    """blurbtune's INFO lines as plain text; anything else with its level and source."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if _own(record):
            return message if record.levelno < logging.WARNING else \
                f"{record.levelname}: {message}"
        return f"{record.levelname} ({record.name}): {message}"


def log_to_console() -> None:
    """Outside Hydra (`blurbtune verify`): the run's console logging (ConsoleFilter and
    ConsoleFormatter on the root logger, INFO and up). Call it before Lightning is imported:
    Lightning gives its logger a handler of its own when the root logger has none."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, ConsoleFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(ConsoleFilter())
    handler.setFormatter(ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class LogFile(logging.FileHandler):
    """A run's `train.log`. On a full disk it stops writing, and says so once in one line
    (logging's own handler prints a traceback for every record it cannot write); the run's
    next write that matters ends it with the full-disk error (blurbtune.train)."""

    full = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.full:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if not (isinstance(error, OSError) and error.errno in FULL):
            super().handleError(record)
        elif not self.full:
            self.full = True
            print(f"warning: {self.baseFilename}: {error.strerror} (errno {error.errno}); "
                  "the log's further lines are on the console only", file=sys.stderr)


def quiet_libraries() -> None:
    """Switch off the library messages that say nothing about the run (idempotent)."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.disable_propagation()  # it has its own handler: one copy, not two
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                            module=r"pytorch_lightning\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller "
                            r"than the logging interval")


def progress_bar(trainer_cfg: Any, callbacks: list) -> list:
    """[blurbtune's progress bar], unless bars are off or the user configured a bar."""
    from pytorch_lightning.callbacks import ProgressBar

    if trainer_cfg.get("enable_progress_bar", True) is False or \
            any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [_bar_class()()]


@contextmanager
def datasets_bars_off() -> Iterator[None]:
    """No `datasets` progress bars inside the block (saving a tokenised split to the cache)."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def label_test(trainer: Any, label: str) -> None:
    """Name the next `trainer.test` bar, e.g. `test (best-on-dev weights)`."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and hasattr(bar, "test_label"):
        bar.test_label = label


def stack_summary(seeds: list[int], module: Any, metric: str) -> str:
    """One line for a stack after its members' own lines: how many completed or diverged, and
    the spread of their best dev scores."""
    scores = sorted(m.best_score for m in module.members if m.diverged is None)
    diverged = [str(s) for s, m in zip(seeds, module.members, strict=True)
                if m.diverged is not None]
    line = f"stack of {len(seeds)} (seeds {', '.join(map(str, seeds))}): {len(scores)} completed"
    if diverged:
        line += f", {len(diverged)} diverged (seed {', '.join(diverged)})"
    if scores:
        line += (f"; dev {metric} best min {scores[0]:.4f}, median "
                 f"{statistics.median(scores):.4f}, max {scores[-1]:.4f}")
    return line


def epoch_label(epoch: int, max_epochs: int | None) -> str:
    """`epoch k/N`, 1-based, from Lightning's 0-based epoch (`epoch k` when N is open)."""
    total = f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else ""
    return f"epoch {epoch + 1}{total}"


_BAR: type | None = None


def _bar_class() -> type:
    """Lightning's tqdm bar with blurbtune's labels (built on first use: imports Lightning)."""
    global _BAR
    if _BAR is not None:
        return _BAR
    from pytorch_lightning.callbacks import TQDMProgressBar
    from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, convert_inf

    class RunProgressBar(TQDMProgressBar):
        """A bar per epoch (`epoch k/N`) that keeps its line, a transient `dev` bar inside
        it, and test bars named by `label_test`. Lightning's bar, with blurbtune's labels and
        no `DataLoader 0` suffix (a run has one loader per split)."""

        def __init__(self) -> None:
            super().__init__(leave=True)
            self.test_label = "test"

        @property
        def train_description(self) -> str:
            return epoch_label(self.trainer.current_epoch, self.trainer.max_epochs)

        @property
        def validation_description(self) -> str:
            return "dev"

        def init_test_tqdm(self) -> Any:
            return Tqdm(desc=self.test_label, position=2 * self.process_position,
                        disable=self.is_disabled, leave=True, dynamic_ncols=True,
                        file=sys.stdout, bar_format=self.BAR_FORMAT)

        def on_train_start(self, *_: Any) -> None:
            pass  # each epoch opens its own bar (leave=True)

        def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
            self.train_progress_bar = self.init_train_tqdm()
            self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                 batch_idx: int) -> None:
            # A run resumed mid-epoch starts without on_train_epoch_start: open its bar here,
            # at the batches the checkpoint had done.
            if self._train_progress_bar is None:
                self.on_train_epoch_start(trainer)
                self.train_progress_bar.n = batch_idx

        def on_train_end(self, *_: Any) -> None:
            if self._train_progress_bar is not None:
                self.train_progress_bar.close()

        def on_exception(self, *_: Any) -> None:
            # Closed now, not when the process exits: after the run's error line, a bar
            # closed at exit would be drawn again below it.
            for bar in (self._train_progress_bar, self._val_progress_bar,
                        self._test_progress_bar):
                if bar is not None:
                    bar.close()

        def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                      batch_idx: int, dataloader_idx: int = 0) -> None:
            if self.has_dataloader_changed(dataloader_idx):
                self.val_progress_bar.reset(
                    total=convert_inf(self.total_val_batches_current_dataloader))

        def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
            if self.has_dataloader_changed(dataloader_idx):
                self.test_progress_bar.reset(
                    total=convert_inf(self.total_test_batches_current_dataloader))

        def get_metrics(self, trainer: Any, pl_module: Any) -> dict:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

    _BAR = RunProgressBar
    return _BAR
