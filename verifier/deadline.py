"""`Deadline`: when long computations must stop, passed down as one small value (no global state).

Every loop that can run long — bound propagation (per node and per chunk of units), the
back-substitution and slope passes (per node), cell analysis and Jacobians (per chunk of
samples), the exactness candidates (per radius), and every attack step (each forward or
gradient pass of a chunk of atoms) — calls `deadline.check(where)` between chunks of work. Past
the deadline it raises `Stopped`, so a stop lands within one such chunk of the limit. `NEVER`
(the default everywhere) never stops and costs one comparison per poll.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


# the flag of an anytime attack result whose time left it no step: its numbers are the samples' own
# (here, torch-free, so that the report can tell such results apart without importing the attacks)
NO_STEP = "no step taken within the time limit (the samples themselves: not an attack result)"


class Stopped(Exception):
    """The caller asked to stop (e.g. an audit's time limit): no result, nothing wrong."""


class Terminated(Stopped):
    """The process got SIGTERM (or SIGHUP): stop like a time limit, so an audit still writes its
    partial report; raised by the CLI's signal handler wherever the main thread is."""


def reraise_signal(err: BaseException) -> None:
    """Raise the `Terminated` behind `err`, if any: for handlers that turn any failure of a library
    call into a refusal or a fallback, which must not swallow a SIGTERM that landed inside it."""
    terminated = terminated_cause(err)
    if terminated is not None:
        raise terminated


def terminated_cause(err: BaseException) -> Terminated | None:
    """The `Terminated` behind `err`, if the signal landed inside library code that wrapped it (e.g.
    `inspect.getfullargspec`, run while torch imports, turns any exception into a TypeError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Terminated):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@dataclass(frozen=True)
class Deadline:
    """Stop once `clock()` reaches `at`, or as soon as `stop_when()` (if given) returns True."""

    at: float = math.inf  # on the scale of `clock`
    clock: Callable[[], float] = time.monotonic
    stop_when: Callable[[], bool] | None = None

    @classmethod
    def after(cls, seconds: float | None, clock: Callable[[], float] = time.monotonic,
              started: float | None = None) -> Deadline:
        """A deadline `seconds` after `started` (a reading of `clock`; default now), `NEVER` for None."""
        if seconds is None:
            return NEVER
        return cls(at=(clock() if started is None else started) + float(seconds), clock=clock)

    @classmethod
    def polling(cls, should_stop: Callable[[], bool] | None) -> Deadline:
        """A deadline that is whatever `should_stop()` says (`NEVER` for None)."""
        return NEVER if should_stop is None else cls(stop_when=should_stop)

    def sooner(self, share: float, reserve: float = 0.0) -> Deadline:
        """A deadline `share` of the way from now to this one, with the same clock and signal check
        (for refinements that must leave time for what follows them); `NEVER` stays `NEVER`.
        `reserve` seconds (work known to come after) are set aside first, but never more than 90 %
        of the time left."""
        if self.at == math.inf:
            return self
        now = self.clock()
        left = max(self.at - now - reserve, 0.1 * (self.at - now), 0.0)
        return Deadline(at=now + share * left, clock=self.clock, stop_when=self.stop_when)

    def expired(self) -> bool:
        """Whether the work should stop now."""
        if self.stop_when is not None and self.stop_when():
            return True
        return self.at != math.inf and self.clock() >= self.at

    def check(self, where: str) -> None:
        """Raise `Stopped` (naming `where`) once the deadline has passed."""
        if self.expired():
            raise Stopped(f"stopped by the time limit during {where}")


NEVER = Deadline()

__all__ = ["NEVER", "NO_STEP", "Deadline", "Stopped"]
