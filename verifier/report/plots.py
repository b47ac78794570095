"""The report's three figures (matplotlib `Figure` objects, never pyplot) and their inline SVG.

`risk_figure`: risk vs delta, the band between the best attack (a lower bound on the worst-case
risk) and the certificate (an upper bound), the global bound dashed, the clean risk, Bai et
al.'s first-order estimate dotted. `accuracy_figure`: clean, certified, attacked accuracy.
`slopes_figure`: per-sample local slopes against the global constant. Each returns None when
there is nothing to draw; `risk_plot`, `accuracy_plot`, `slopes_plot` give the same figures as
SVG strings, self-contained (no XML prolog, no namespace URLs) with ids prefixed per figure so
several figures can share one HTML page.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib
import numpy as np
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from verifier.report.numbers import fmt, fmt_pct, per_255, value
from verifier.report.summary import vacuous_note

_SIZE = (6.4, 4.4)
_COLORS = {"certificate": "#1f5fa8", "attack": "#c0392b", "band": "#9b8fc7", "global": "#6b6b6b",
           "clean": "#222222", "first": "#2e8b57", "certified": "#1f5fa8",
           "threshold": "#d35400"}
_ATTACK_COLORS = ("#8e44ad", "#e67e22", "#16a085", "#7f8c8d", "#b8860b", "#2c3e50")
_RC = {"svg.fonttype": "none", "svg.hashsalt": "verifier-report", "font.size": 9}
_ID = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def _series(results: list[dict], key: str) -> np.ndarray:
    """One field over the deltas as floats; null and non-finite entries as NaN."""
    numbers = [value(r.get(key)) for r in results]
    return np.array([n if n is not None and math.isfinite(n) else np.nan for n in numbers], dtype=float)


def _svg(fig: Figure, name: str, label: str) -> str:
    """`fig` as an inline `<svg>` element with ids prefixed by `name`."""
    buffer = io.StringIO()
    FigureCanvasSVG(fig)
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format="svg", bbox_inches="tight",
                    metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text, count=2).replace("xlink:href=", "href=")
    text = re.sub(r'<svg\s+width="[^"]*"\s+height="[^"]*"',
                  f'<svg role="img" aria-label="{label}" class="plot" id="{name}-svg"', text, count=1)
    ids = set(re.findall(r'\bid="([^"]+)"', text)) - {f"{name}-svg"}
    return _ID.sub(lambda m: m.group(1) + (f"{name}-{m.group(2)}" if m.group(2) in ids else m.group(2)), text)


def _figure() -> tuple[Figure, object]:
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=_SIZE, layout="constrained")
        return fig, fig.add_subplot()


def _finite(*arrays: np.ndarray) -> np.ndarray:
    joined = np.concatenate([a.ravel() for a in arrays]) if arrays else np.array([])
    return joined[np.isfinite(joined)]


def _top(near: np.ndarray, low_limit: float | None = None) -> tuple[float, float]:
    """y-limits focused on `near` (clean, attacks, certificate): from 0 (or just below) to ~1.3× the largest."""
    low, high = float(near.min()), float(near.max())
    span = max(high - low, 1e-12 * max(1.0, abs(high)), 1e-9)
    bottom = 0.0 if 0 <= low <= 0.5 * high else low - 0.1 * span
    top = max(1.3 * high, high + 0.1 * span) if low >= 0 else high + 0.3 * span
    if low_limit is not None and bottom < low_limit < top + 2 * span:  # a threshold near the data: show it
        top = max(top, low_limit + 0.08 * (top - bottom))
    return bottom, top


def _off_scale(series: np.ndarray, top: float) -> str | None:
    """None when `series` fits under `top`, else a note such as "11–88, off scale"."""
    values = series[np.isfinite(series)]
    if not values.size or float(values.max()) <= top:
        return None
    low, high = float(values.min()), float(values.max())
    if low > top:
        both = f"{fmt(low, 2)}–{fmt(high, 2)}" if fmt(low, 2) != fmt(high, 2) else fmt(low, 3)
        return f"{both}, off scale"
    return f"partly off scale, up to {fmt(high, 3)}"


def _label(text: str, *notes: str | None) -> str:
    """`text — note, note` (notes that are None left out)."""
    kept = [n for n in notes if n]
    return text + (" — " + "; ".join(kept) if kept else "")


def _delta_axis(ax, deltas: np.ndarray) -> None:
    """x ticks at the budgets written k/255 when every budget is one (labels too close together dropped)."""
    ks = [0 if d == 0 else per_255(float(d)) for d in deltas]
    if not deltas.size or any(k is None for k in ks) or len(ks) > 12:
        return
    span = max(float(deltas.max()) - float(deltas.min()), 1e-12)
    chosen: list[tuple[float, int]] = []
    for d, k in sorted(zip(deltas.tolist(), ks), reverse=True):  # keep the large budgets, drop crowded small ones
        if not chosen or chosen[-1][0] - d >= 0.07 * span:
            chosen.append((d, k))
    chosen.reverse()
    ax.set_xticks([d for d, _ in chosen], ["0" if k == 0 else f"{k}/255" for _, k in chosen])


def _legend(fig: Figure, ax) -> None:
    """The legend under the axes (it never hides a curve)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7, frameon=False)


def _per_delta(report: dict) -> tuple[list[dict], np.ndarray]:
    """The per-delta results and their deltas (both empty when no delta was analysed)."""
    results = report.get("results") or []
    return results, np.array([r["delta"] for r in results], dtype=float)


def _band(ax, deltas: np.ndarray, low: np.ndarray, high: np.ndarray, label: str) -> None:
    """Shade between two series where both are finite: where the true value lies."""
    both = np.isfinite(low) & np.isfinite(high)
    if both.any():
        ax.fill_between(deltas, np.where(both, low, 0), np.where(both, high, 0), where=both,
                        color=_COLORS["band"], alpha=0.3, linewidth=0, label=label)


def risk_figure(report: dict) -> Figure | None:
    """Risk vs delta on a linear scale focused on clean risk, attacks and certificate, with the max-risk line.

    The band lies between the best attack and the certificate; the global bound (dashed) and a vacuous
    certificate are drawn clipped and marked off scale in the legend when they rise above the axes.
    """
    results, deltas = _per_delta(report)
    if not results:
        return None
    clean, cert = _series(results, "clean_risk"), _series(results, "certificate")
    attack, bound = _series(results, "best_attack_risk"), _series(results, "global_bound")
    first = _series(results, "first_order_estimate")
    limit = value(report["settings"]["thresholds"].get("max_risk"))
    vacuous = vacuous_note(report) is not None
    near = _finite(clean, attack, first) if vacuous else _finite(clean, cert, attack, first)
    fig, ax = _figure()
    with matplotlib.rc_context(_RC):
        bottom, top = _top(near if near.size else np.array([0.0, 1.0]), limit)
        _band(ax, deltas, attack, cert, "worst-case risk lies here")
        label = _label("certificate (upper bound)", "vacuous" if vacuous else None, _off_scale(cert, top))
        ax.plot(deltas, cert, "-o", color=_COLORS["certificate"], ms=4, label=label)
        ax.plot(deltas, attack, "-s", color=_COLORS["attack"], ms=4, label="best attack (lower bound)")
        ax.plot(deltas, clean, "-", color=_COLORS["clean"], lw=1, label="clean risk")
        if np.isfinite(first).any():
            ax.plot(deltas, first, ":", color=_COLORS["first"], lw=1.5, label="first-order estimate (not a bound)")
        if np.isfinite(bound).any():
            ax.plot(deltas, bound, "--", color=_COLORS["global"], lw=1,
                    label=_label("global Lipschitz bound", _off_scale(bound, top)))
        if limit is not None and math.isfinite(limit):
            shown = bottom <= limit <= top
            ax.axhline(limit, color=_COLORS["threshold"], ls="-.", lw=1.2,
                       label=_label(f"max-risk threshold {fmt(limit)}", None if shown else "off scale"))
        ax.set_ylim(bottom, top)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=7))
        notes = []
        if any(r.get("certificate") == "Infinity" for r in results):
            notes.append("certificate infinite at some delta")
        if all(r.get("certificate") is None for r in results):
            notes.append("no certificate for this loss")
        _delta_axis(ax, deltas)
        ax.set_xlabel("Wasserstein budget delta")
        ax.set_ylabel(f"expected {report['settings']['loss']} loss")
        ax.set_title("Worst-case risk vs budget" + "".join(f" ({n})" for n in notes))
        ax.grid(alpha=0.3)
        _legend(fig, ax)
    return fig


def accuracy_figure(report: dict) -> Figure | None:
    """Accuracy vs delta: clean, certified (lower bound), best attacked (upper bound), each attack, thresholds."""
    results, deltas = _per_delta(report)
    if not results:
        return None
    certified, attacked = _series(results, "certified_accuracy"), _series(results, "best_attack_accuracy")
    thresholds = report["settings"]["thresholds"]
    fig, ax = _figure()
    with matplotlib.rc_context(_RC):
        _band(ax, deltas, certified, attacked, "robust accuracy lies here")
        ax.plot(deltas, _series(results, "clean_accuracy"), "-", color=_COLORS["clean"], lw=1, label="clean")
        ax.plot(deltas, certified, "-o", color=_COLORS["certified"], ms=4, label="certified (lower bound)")
        ax.plot(deltas, attacked, "-s", color=_COLORS["attack"], ms=4, label="best attack (upper bound)")
        for index, method in enumerate(report["settings"]["attacks"]):
            each = _series([r["attacks"].get(method) or {} for r in results], "robust_accuracy")
            if np.isfinite(each).any():
                ax.plot(deltas, each, "--", lw=0.9, alpha=0.8, color=_ATTACK_COLORS[index % len(_ATTACK_COLORS)],
                        label=f"attack {method}".replace("$", r"\$"))
        for name, color, what in (("min_certified_accuracy", _COLORS["certified"], "min certified accuracy"),
                                  ("min_robust_accuracy", _COLORS["attack"], "min robust accuracy")):
            limit = value(thresholds.get(name))
            if limit is not None:
                ax.axhline(limit, color=color, ls="-.", lw=1.2, alpha=0.9,
                           label=f"threshold: {what} {fmt_pct(limit)}")
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        _delta_axis(ax, deltas)
        ax.set_xlabel("Wasserstein budget delta")
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy under distribution shift")
        ax.grid(alpha=0.3)
        _legend(fig, ax)
    return fig


def slopes_figure(report: dict) -> Figure | None:
    """Histogram of per-sample local slopes ||grad loss(x_i)||_* with the global constant as a line."""
    slopes = report.get("local_slopes")
    if not slopes or not slopes.get("per_sample"):
        return None
    data = np.array(slopes["per_sample"], dtype=float)
    constant = value(slopes.get("global"))
    fig, ax = _figure()
    with matplotlib.rc_context(_RC):
        positive = data[data > 0]
        top = float(data.max())
        log = (constant is not None and math.isfinite(constant) and positive.size and top > 0
               and constant / top > 20)
        note = ""
        if log:
            bins = np.geomspace(float(positive.min()), max(constant, top) * 1.2, 40)
            ax.hist(positive, bins=bins, color=_COLORS["certificate"], alpha=0.8, label="local slope per sample")
            ax.set_xscale("log")
            if positive.size < data.size:
                note = f" ({data.size - positive.size} zero slope(s) not shown)"
        else:
            ax.hist(data, bins=min(30, max(5, data.size // 3)), color=_COLORS["certificate"], alpha=0.8,
                    label="local slope per sample")
        if constant is not None and math.isfinite(constant):
            ax.axvline(constant, color=_COLORS["global"], ls="--", label=f"global constant {fmt(constant, 3)}")
        elif constant is not None:
            note += " (global constant infinite)"
        median = float(np.median(data))
        ax.axvline(median, color=_COLORS["attack"], ls=":", label=f"median {fmt(median, 3)}")
        norm = slopes.get("norm", "")
        ax.set_xlabel(f"||grad loss(x_i)||_* (dual of the {norm} norm)" if norm else "||grad loss(x_i)||_*")
        ax.set_ylabel("samples")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"Local slopes of {data.size} samples vs the global constant{note}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return fig


def _inline(fig: Figure | None, name: str, label: str) -> str | None:
    return None if fig is None else _svg(fig, name, label)


def risk_plot(report: dict) -> str | None:
    """`risk_figure` as inline SVG (None when no delta was analysed)."""
    return _inline(risk_figure(report), "risk", "worst-case risk versus budget delta")


def accuracy_plot(report: dict) -> str | None:
    """`accuracy_figure` as inline SVG (None when no delta was analysed)."""
    return _inline(accuracy_figure(report), "accuracy", "accuracy versus budget delta")


def slopes_plot(report: dict) -> str | None:
    """`slopes_figure` as inline SVG (None without local slopes)."""
    return _inline(slopes_figure(report), "slopes", "histogram of local slopes")
