"""How report numbers read: one formatter shared by the verdict lines, HTML, Markdown and plots."""

from __future__ import annotations

import math

MISSING = "—"


def value(item) -> float | None:
    """A report number as a float (the string "Infinity" as inf); None for null/"NaN"/anything else."""
    if isinstance(item, bool) or item is None:
        return None
    if isinstance(item, (int, float)):
        return float(item)
    return {"Infinity": math.inf, "-Infinity": -math.inf}.get(item) if isinstance(item, str) else None


def fmt(item, digits: int = 4) -> str:
    """`0.1235`, `1.2e-05`, `∞`, `NaN`, or `—` for null."""
    if isinstance(item, bool):
        return "yes" if item else "no"
    if item == "NaN":
        return "NaN"
    number = value(item)
    if number is None:
        return MISSING
    if math.isinf(number):
        return "∞" if number > 0 else "-∞"
    if number == int(number) and abs(number) < 1e6:
        return str(int(number))
    return f"{number:.{digits}g}"


def fmt_pct(item) -> str:
    """A fraction in [0, 1] as a percentage (`87.5%`), `—` for null."""
    number = value(item)
    return MISSING if number is None or not math.isfinite(number) else f"{100 * number:.1f}%"


def fmt_seconds(item) -> str:
    """`0.42 s`, `—` for null."""
    number = value(item)
    return MISSING if number is None else f"{number:.2f} s"
