"""What a run reports: the logs written while it trains (log.py) and summary.json at its end
(summary.py)."""

from bll_ds.metrics.log import MetricsLog, log_step_records
from bll_ds.metrics.summary import build_summary, write_summary

__all__ = ["MetricsLog", "log_step_records", "build_summary", "write_summary"]
