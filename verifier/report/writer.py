"""`write_report`: report.html, report.md and report.json in one folder, each written atomically.

Every file goes to a temporary file in the target folder and is renamed into place
(`os.replace`); a failure or an interrupt at any point removes the temporary file. An old
report.json is removed first and the new one is written last, so a report.json exists only
next to the complete HTML and Markdown it describes.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from verifier.report.html import render_html
from verifier.report.markdown import render_markdown
from verifier.report.schema import validate_report

JSON_NAME, HTML_NAME, MARKDOWN_NAME = "report.json", "report.html", "report.md"


@dataclass(frozen=True)
class ReportPaths:
    """Where the three files of a report were written."""

    json: Path
    html: Path
    markdown: Path

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"json": str(self.json), "html": str(self.html), "markdown": str(self.markdown)}


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and a rename."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def report_json(report: dict) -> str:
    """The strict JSON text of a report (indented, keys in schema order, no NaN/Infinity tokens)."""
    return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike[str]) -> ReportPaths:
    """Validate `report` (a finalized dict, see `finalize_report`) and write its three files into `out_dir`."""
    validate_report(report)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(json=folder / JSON_NAME, html=folder / HTML_NAME, markdown=folder / MARKDOWN_NAME)
    text = report_json(report)
    paths.json.unlink(missing_ok=True)  # from here on, no report.json until the new one is complete
    page, summary = render_html(report), render_markdown(report)
    write_atomic(paths.html, page)
    write_atomic(paths.markdown, summary)
    write_atomic(paths.json, text)
    return paths
