"""The HTML report of a run (:func:`build_report`), and reading run directories back."""

from imgclust.report.html import REPORT_NAME, build_report
from imgclust.report.rundata import RunData, load_run, open_run_source

__all__ = ["REPORT_NAME", "RunData", "build_report", "load_run", "open_run_source"]
