"""`blurbtune report`: tables and plots from a sweep's results.json files."""

from blurbtune.report.build import make_report

__all__ = ["make_report"]
