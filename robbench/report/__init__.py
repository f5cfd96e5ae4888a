"""Reports: paper tables beside their published numbers, transferability heatmaps, accuracy curves,
training views, sanity flags and the leaderboard (``robbench report``)."""
from __future__ import annotations

from robbench.report.write import write_report

__all__ = ["write_report"]
