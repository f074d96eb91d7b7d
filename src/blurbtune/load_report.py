"""transformers' LOAD REPORT, shown only when it says something about the encoder.

Loading a pretrained encoder under a new task head always "misses" the head's weights and
leaves out the pretraining head's (`cls.*`, a pooler the token head has no use for): that is
the task head blurbtune asked for, and the report about it teaches nothing. A missing or
unexpected key of the encoder itself (embeddings, layers) means the checkpoint does not fit
the model, and the report is shown as transformers wrote it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

REPORT_LOGGER = "transformers.modeling_utils"


def encoder_keys(keys: Iterable[str], prefix: str, encoder_modules: Iterable[str]) -> list[str]:
    """The keys (as in a loading report) that belong to the encoder's own modules.

    Keys may carry the base model's prefix (`bert.encoder...`) or not (a checkpoint of the
    bare encoder); the pooler and the heads are not encoder modules.

    >>> encoder_keys(["classifier.bias", "bert.encoder.layer.3.output.dense.weight",
    ...               "pooler.dense.weight", "cls.predictions.bias"], "bert",
    ...              ["embeddings", "encoder"])
    ['bert.encoder.layer.3.output.dense.weight']
    """
    modules = set(encoder_modules)
    out = []
    for key in keys:
        rest = key.removeprefix(f"{prefix}.") if prefix else key
        if rest.split(".", 1)[0] in modules:
            out.append(key)
    return sorted(out)


def encoder_modules(model: Any) -> list[str]:
    """The base model's child modules except the pooler (embeddings, encoder, ...)."""
    return [name for name, _ in model.base_model.named_children() if name != "pooler"]


class _Capture(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextmanager
def quiet_load() -> Iterator[_Capture]:
    """Hold back the LOAD REPORT and the weight-loading bar of a `from_pretrained` call.

    After the block, `show_if_encoder(capture, model, info)` prints the report if it concerns
    the encoder (`info` from `from_pretrained(..., output_loading_info=True)`).
    """
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger(REPORT_LOGGER)
    capture = _Capture()
    logger.addFilter(capture)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield capture
    except BaseException:
        logger.removeFilter(capture)
        for record in capture.records:  # the report explains the failure: show it
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(capture)
        if bars:
            hf_logging.enable_progress_bar()


def show_if_encoder(capture: _Capture, model: Any, info: dict) -> list[str]:
    """Re-emit the held report when encoder keys are missing or unexpected; return them."""
    keys = [*info.get("missing_keys", ()), *info.get("unexpected_keys", ()),
            *(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))]
    found = encoder_keys(keys, model.base_model_prefix, encoder_modules(model))
    if found:
        logger = logging.getLogger(REPORT_LOGGER)
        for record in capture.records:
            logger.handle(record)
    return found
