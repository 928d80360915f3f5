"""JSON + Markdown report writers."""

from qcompress.reports.writer import Report, md_table, write_report

__all__ = ["Report", "md_table", "write_report"]
