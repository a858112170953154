"""Step 8, report: what `regbn.inspect` returns, and its views.

Owns: the report's data (`data`: `ReportData`, `Row`, `Line`, `InputInfo`, `Summary`), reading
rows off the annotated graph (`rows`), what the views share (`cells`: colours, dependence
cells), the views (`render_text`, `render_html`, `render_json`, `render_graph`), which read
the data and never import each other, and the entry point (`api`: `inspect`, `Report`, the
data plus one method per view).

Reads: every key steps 1-5 wrote, and the dependence step's results with ``batches=``.

Writes on nodes: nothing.
"""

from __future__ import annotations

from .api import Report, inspect, report_from_graph
from .data import InputInfo, Line, ReportData, Row, Summary

__all__ = ["InputInfo", "Line", "Report", "ReportData", "Row", "Summary", "inspect",
           "report_from_graph"]
