"""How report numbers read: one formatter shared by the verdict lines, HTML, Markdown and plots."""

from __future__ import annotations

import math
import numbers

MISSING = "—"


def value(item) -> float | None:
    """A report number as a float (the string "Infinity" as inf); None for null/"NaN"/anything else."""
    if isinstance(item, bool) or item is None:
        return None
    if isinstance(item, numbers.Real):  # numpy scalars too
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


def per_255(item) -> int | None:
    """k when a budget is (to float32 precision) k/255 and not a short decimal (0.2 = 51/255 stays 0.2)."""
    number = value(item)
    if number is None or not math.isfinite(number) or number <= 0:
        return None
    k = round(number * 255)
    if k < 1 or abs(number * 255 - k) > 1e-5 * k:
        return None
    short = float(f"{number:.4g}")
    return None if abs(short - number) <= 1e-9 * number else k


def fmt_delta(item, digits: int = 3) -> str:
    """A budget: `8/255 (0.0314)` when it is k/255, else as `fmt` writes it (`0.05`)."""
    k = per_255(item)
    return fmt(item) if k is None else f"{k}/255 ({fmt(item, digits)})"


_SOURCE_NAMES = {"milp_exact": "MILP (exact)", "milp_bound": "MILP (bound at a limit)",
                 "split_exact": "split (exact)", "split_bound": "split (bound at a limit)", "cell": "cell (exact)",
                 "linear": "linear bound", "jacobian": "slope bound", "global": "global bound", "none": "no route",
                 "unmoved": "no move", "milp_penalised": "penalised MILP (W_p dual)",
                 "grid": "grid beyond the penalised MILP"}


def fmt_sources(sources) -> str:
    """Where a certificate's decisive curve points came from: `MILP (exact) 75%, linear bound 25%`."""
    if not sources:
        return MISSING
    ranked = sorted(sources.items(), key=lambda item: -float(item[1]))
    return ", ".join(f"{_SOURCE_NAMES.get(name, name)} {fmt_pct(share)}" for name, share in ranked if share > 0)


def fmt_exact_mode(mode) -> str | None:
    """One sentence on what the MILP route did (None when it was not asked for or did not run)."""
    if not mode:
        return None
    if not mode.get("active"):
        return None if mode.get("mode") == "off" else f"Exact mode ({mode['mode']}) did not run: {mode.get('reason')}."
    solver = "branch and bound" if mode.get("solver") == "split" else "MILP"
    penalised = mode.get("penalised_points") or 0
    extra = f", {penalised} penalised MILP point(s) for the W_p dual" if penalised else ""
    return (f"Exact mode ({mode['mode']}): {solver} at {mode['points_solved']} curve point(s), "
            f"{mode['points_optimal']} solved to optimality, {mode['points_skipped']} left to the linear bounds"
            f"{extra}, {fmt_seconds(mode['seconds'])}.")


def fmt_box(box) -> str:
    """The input box `[lo, hi]` (`[0, 1]`), `none (unbounded)` for null."""
    if box is None:
        return "none (unbounded)"
    return "[" + ", ".join(fmt(v) for v in box) + "]"
