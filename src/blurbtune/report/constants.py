"""What every part of the report agrees on: the test level, the intervals' confidence and
bootstrap, the reference stabilizer, and how a number is shown. The report's modules import
these from here and from nowhere else; this module imports none of them."""

from __future__ import annotations

from typing import Any

import pandas as pd

CONFIDENCE = 0.95
ALPHA = 0.05  # every test is two-sided at this level
BOOTSTRAP_METHOD = "percentile"
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
# Each stabilizer is compared with this one in an otherwise identical configuration.
REFERENCE_STABILIZER = "none"
# What a table shows for a value that is absent or undefined.
MISSING = "-"


def number(value: Any) -> str:
    """A hyperparameter for display: 3e-05, 16, or "-"."""
    if pd.isna(value):
        return MISSING
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"
