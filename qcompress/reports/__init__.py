"""JSON + Markdown report writers."""

from qcompress.reports.writer import Report, check_report_target, md_table, write_report

__all__ = ["Report", "check_report_target", "md_table", "write_report"]
