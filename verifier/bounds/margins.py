"""`margin_bounds`: certified upper bounds on every margin `z_j - z_y` over `B(x, s) ∩ box` (§3.3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds.network import BoundNetwork
from verifier.bounds.optimise import SlopeSearch, optimised_upper_bound
from verifier.bounds.propagate import (Bounds, MarginProblem, PerClassResult, margin_problem, propagate, rows_at_once,
                                       upper_bound)
from verifier.convert import ConvertedModel
from verifier.deadline import NEVER, Deadline
from verifier.device import resolve_device
from verifier.geometry import parse_norm


@dataclass(frozen=True)
class MarginBounds(PerClassResult):
    """`upper[i, j] >= max over the set of z_j - z_y` (0 at j = y), per sample and radius."""

    upper: torch.Tensor  # (N, C)

    @property
    def worst_margin(self) -> torch.Tensor:
        """`max_{j != y} upper[i, j]`: an upper bound on the margin loss over the set (N,)."""
        return self.worst_other(self.upper)

    @property
    def certified(self) -> torch.Tensor:
        """Samples proved correct on the whole set (every `upper_j < 0`, ties count as errors)."""
        return self.worst_margin < 0


def margin_bounds(model: ConvertedModel | BoundNetwork, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                  radius: torch.Tensor | float, norm: str | float = "inf", box: tuple[float, float] | None = None,
                  device: str = "auto", dtype: torch.dtype = torch.float64, tighten: bool = True,
                  deadline: Deadline = NEVER, optimise: SlopeSearch | None = None) -> MarginBounds:
    """Upper bounds on all margins over `B_r(x_i, s_i) ∩ box` by linear bound propagation.

    `optimise`: search the relaxations' free slopes of the final back-substitution (alpha-CROWN,
    `verifier.bounds.optimise`); None keeps the default lines (and then only the intervals those read
    are tightened: `propagate(margins_only=True)`).
    """
    problem = margin_problem(model, x, y, radius, parse_norm(norm), box, resolve_device(device), dtype)
    state = propagate(problem.network, problem.region, tighten, deadline, margins_only=optimise is None)
    return margins_from(problem, state, deadline, optimise)


def margins_from(problem: MarginProblem, state: Bounds, deadline: Deadline = NEVER,
                 optimise: SlopeSearch | None = None) -> MarginBounds:
    """Margin bounds from an already propagated state (shared with `slopes_from`)."""
    if optimise is None:  # the margins' rows are independent: a few at a time (propagate.ROW_ELEMENTS)
        rows = problem.rows
        step = rows_at_once(problem.network, state.intervals, len(rows))
        values = torch.cat([upper_bound(problem.network, state, problem.region, problem.network.output,
                                        rows[:, start:start + step], deadline)
                            for start in range(0, rows.shape[1], step)], 1)
    else:
        values = optimised_upper_bound(problem.network, state, problem.region, problem.network.output, problem.rows,
                                       optimise, deadline)
    return MarginBounds(norm=problem.region.norm, radius=problem.region.radius, labels=problem.labels,
                        upper=values.masked_fill(problem.true_class, 0.0))
