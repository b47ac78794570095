"""Render a report.json as one PNG for the README: the verdict line above the risk and accuracy plots.

Usage: python tools/report_picture.py verifier-report/report.json docs/report-example.png
"""

from __future__ import annotations

import io
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from verifier.report import plots  # noqa: E402


def _pixels(figure: Figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    buffer.seek(0)
    return mpimg.imread(buffer)


def main(report_path: str, out_path: str) -> None:
    report = json.loads(open(report_path, encoding="utf-8").read())
    panels = [_pixels(make(report)) for make in (plots.risk_figure, plots.accuracy_figure)]
    canvas = Figure(figsize=(12, 4.6))
    canvas.text(0.01, 0.96, f"verifier audit — {report['verdict']['summary']}", fontsize=10,
                va="top", weight="bold")
    for index, image in enumerate(panels):
        axes = canvas.add_axes((0.005 + 0.5 * index, 0.0, 0.49, 0.88))
        axes.imshow(image)
        axes.axis("off")
    canvas.savefig(out_path, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
