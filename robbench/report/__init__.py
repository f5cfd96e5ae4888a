"""Reports: paper tables beside their published numbers, transferability heatmaps, accuracy curves,
training views, sanity flags and the leaderboard (``robbench report``)."""
from __future__ import annotations

from robbench.report.write import ReportOutput, build_report, write_report

__all__ = ["ReportOutput", "build_report", "write_report"]
