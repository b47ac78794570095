"""Memory guards: the limit work must stay under, and checks made from shapes before allocating.

The limit is `--memory-limit` when given, else half of the memory the system reports available
(``MemAvailable`` in /proc/meminfo; all physical memory where that is unreadable). Checks are
made from declared shapes and file sizes before any allocation, so that a model declaring a
dimension of 10^10, a fixed batch of 10^9 or a 2.5 GB external tensor is refused in one line
instead of exhausting the machine.

How the limit is shared is said here once: one forward/gradient pass's autograd tensors may take
`PASS_FRACTION` of it (`pass_bytes`), an attack's own working tensors (iterates, gradients,
candidates of the rows it processes at once) `WORKING_FRACTION` (`working_bytes`); the rest is left
for the model, the onnxruntime session, the results kept and the interpreter.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

from verifier.errors import ResourceLimitError, UsageError

DEFAULT_FRACTION = 0.5
PASS_FRACTION = 0.25  # of the limit: the autograd tensors of one forward/gradient pass
WORKING_FRACTION = 0.25  # of the limit: an attack's iterates, gradients and candidates held at once
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`8G`, `512M`, `1.5GiB` or a byte count -> bytes (binary units); must be > 0."""
    match = _SIZE.match(text or "")
    if not match:
        raise UsageError(f"--memory-limit: {text!r} is not a size like 8G, 512M or 1.5GiB")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not (math.isfinite(value) and value >= 1):
        raise UsageError(f"--memory-limit must be at least one byte (got {text})")
    return int(value)


def available_memory() -> int:
    """Bytes the system reports available now (MemAvailable), else its physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def memory_limit(requested: int | None = None) -> int:
    """The limit in bytes: `requested`, else half of the available memory."""
    return int(requested) if requested is not None else int(available_memory() * DEFAULT_FRACTION)


def pass_bytes(limit: int | None = None) -> int:
    """Bytes one forward/gradient pass may use (`PASS_FRACTION` of `memory_limit(limit)`)."""
    return int(memory_limit(limit) * PASS_FRACTION)


def working_bytes(limit: int | None = None) -> int:
    """Bytes an attack's own working tensors may use at once (`WORKING_FRACTION` of `memory_limit(limit)`)."""
    return int(memory_limit(limit) * WORKING_FRACTION)


def rows_fitting(budget: int, row_bytes: int) -> int:
    """How many rows of `row_bytes` each fit in `budget` bytes (at least one)."""
    return max(1, int(budget) // max(int(row_bytes), 1))


def require_within(what: str, needed: int | float, limit: int | None = None) -> None:
    """Raise `ResourceLimitError` when `needed` bytes exceed the limit (default: `memory_limit()`)."""
    allowed = memory_limit(limit)
    if needed > allowed:
        raise ResourceLimitError(what, int(needed), allowed)


def tensor_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a dense tensor (Python integers: no overflow for absurd shapes)."""
    count = 1
    for dim in shape:
        count *= max(int(dim), 0)
    return count * int(itemsize)
