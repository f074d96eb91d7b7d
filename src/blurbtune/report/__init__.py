"""`blurbtune report`: tables and plots from a sweep's results.json files."""

from __future__ import annotations

from typing import Any

__all__ = ["make_report"]


def __getattr__(name: str) -> Any:
    # pandas, scipy and matplotlib load only when a report is made, not for `report --help`
    if name == "make_report":
        from blurbtune.report.build import make_report

        return make_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
