"""The audit report: one dict (report.json, docs/report.md) rendered to HTML and Markdown.

`finalize_report` fills the derived fields (best attack, tightness, verdicts, exit code),
`validate_report` checks the schema, `write_report` writes report.html, report.md and, last,
report.json into a folder, each file atomically. `summary` derives, at render time only, the
threshold margins, the vacuous-certificate note and the warnings/notes split shown at the top.
"""

from __future__ import annotations

from verifier.report.derive import finalize_report
from verifier.report.html import SECTION_IDS, render_html, verdict_label
from verifier.report.markdown import render_markdown
from verifier.report.schema import REPORT_SCHEMA, SCHEMA_VERSION, ReportSchemaError, validate_report
from verifier.report.writer import ReportPaths, report_json, write_report

__all__ = [
    "REPORT_SCHEMA", "SCHEMA_VERSION", "SECTION_IDS", "ReportPaths", "ReportSchemaError", "finalize_report",
    "render_html", "render_markdown", "report_json", "validate_report", "verdict_label", "write_report",
]
