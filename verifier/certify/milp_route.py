"""The MILP route of the growth curves (method §8): exact worst margins where the aggregation needs them.

Which curve points decide a certificate is known after aggregating: for `p = inf` the grid
radius of each delta, otherwise the piece of every sample's curve that attains its inner sup at
the dual's `lambda` (`aggregate.used_points`). `refine_with_milp` solves the MILP of
`verifier.exact` at exactly those (sample, radius) points that no exact route covers yet (beyond
the sample's cell), writes the bounds into the evidence (`MarginEvidence.milp`), aggregates again
and repeats while new points become decisive, within a time budget. Every value written is an
upper bound (the dual bound; exact when the MILP was solved to optimality), so the certificate
stays sound at any stop. The maximisers found are kept as explicit moves for the realising
distribution (§3.5), which is what makes the certificate `exact` when every decisive point is.
Where the MILP cannot state the net (smooth activations, MaxPool) and the threat is ℓ∞ on
at most `SPLIT_MAX_INPUTS` inputs, input-splitting branch and bound (`exact.bab`) takes its place
(its bound is the maximum over leaves: sound at any stop; "exact" when the leaves meet the best
leaf centre within `SPLIT_TOLERANCE`). `--exact split` uses ReLU-splitting branch and bound
(`exact.relu_bab`, any input size) at every decisive point instead of the MILP; `auto` takes it
(`AUTO_RELU_LEAVES` leaves) at points whose MILP has more than `AUTO_MAX_UNSTABLE` binaries. For
`p < inf` and the margin loss, the MILP route ends with the penalised MILPs of the dual's inner
sups (`penalty_route`), whose bounds go to the certificate (`MilpReport.penalised`).

`--exact auto` runs the route only when it is cheap and pays: the margin and zero_one losses (for
CE the MILP bounds the margins only, and measured on the digits MLP it moved the certificate by
< 0.4 % at 4.6x the certify time), an encodable net (ReLU-family units, affine maps) of at most
`point_solvers.AUTO_MAX_UNITS` units, a polyhedral threat (ℓ∞ or ℓ1), points with at most
`AUTO_MAX_UNSTABLE` unstable units (binaries), at most `AUTO_NODE_LIMIT` branch-and-bound nodes
per MILP and `AUTO_MAX_POINTS` points in all. Its budget counts work, not seconds, so `auto`
gives the same numbers on every machine. Points are solved from the smallest radius up, so what
the budget covers is the budgets' low end, where `exact_up_to_delta` is decided. `on` has no
caps but `seconds` (total) and `per_milp_seconds` (per MILP, and per point for ReLU splitting).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import margin_problem, propagate
from verifier.cells import CellAnalysis
from verifier.certify.aggregate import PenalisedBound, excess_bound, used_points
from verifier.certify.growth import (ROUTES, MarginEvidence, RouteGrowth, collect_evidence, growth_curves,
                                     margin_class_curves)
from verifier.certify.penalty_route import penalised_bounds
from verifier.certify.point_solvers import point_solver
from verifier.deadline import NEVER, Deadline
from verifier.errors import UsageError
from verifier.exact.milp import project_displacement
from verifier.losses import margins

EXACT_MODES = ("auto", "on", "split", "off")
AUTO_MAX_UNSTABLE = 48
AUTO_MAX_POINTS = 100
AUTO_LOSSES = ("margin", "zero_one")
AUTO_NODE_LIMIT = 2000
NOT_RUN, OPTIMAL, AT_LIMIT, SKIPPED, SPLIT_EXACT, SPLIT_BOUND = 0, 1, 2, 3, 4, 5
EXACT_STATUS = (OPTIMAL, SPLIT_EXACT)


@dataclass(frozen=True)
class ExactSettings:
    """How the MILP route runs (None: the mode's default)."""

    mode: str = "auto"  # auto | on | split | off
    seconds: float | None = None  # total MILP time (None: unlimited)
    max_unstable: int | None = None  # binaries per MILP (None: AUTO_MAX_UNSTABLE under auto, no cap under on)
    max_points: int | None = None  # (sample, radius) points (None: AUTO_MAX_POINTS under auto, no cap under on)
    node_limit: int | None = None  # per MILP (None: AUTO_NODE_LIMIT under auto, none under on)
    per_milp_seconds: float | None = None  # per MILP (None: none under auto, which stays deterministic; 10 s under on)
    rounds: int = 16  # aggregate -> solve (or refine the grid) -> aggregate again
    penalised: bool = True  # p < inf, margin loss: the dual's inner sups by penalised MILPs (penalty_route)

    def __post_init__(self) -> None:
        if self.mode not in EXACT_MODES:
            raise UsageError(f"exact must be one of {', '.join(EXACT_MODES)} (got {self.mode!r})")


@dataclass(frozen=True, eq=False)
class MilpReport:
    """What the MILP route did: counts, time, per-point status and the maximisers found."""

    mode: str
    active: bool  # the route ran (the model and threat allowed it)
    reason: str  # why it did not run, or ""
    solver: str  # "milp" (the MILP, ReLU splitting where too big), "split" (branch and bound only) or ""
    solved: int  # (sample, radius) points bounded by a MILP
    optimal: int  # ... of which solved to optimality (exact)
    skipped: int  # points left to the linear bounds (too many unstable units, or the time budget)
    seconds: float
    status: torch.Tensor  # (N, K+1) int8: NOT_RUN, OPTIMAL, AT_LIMIT, SKIPPED, SPLIT_EXACT, SPLIT_BOUND
    moves: torch.Tensor | None  # (N, E, d): displacements of the maximisers (zero = no move)
    penalised: tuple[PenalisedBound, ...] = ()  # p < inf: inner-sup bounds by penalised MILPs (one per delta)
    penalised_points: int = 0  # ... (sample, delta) MILP points behind them

    def to_dict(self) -> dict:
        """JSON-ready summary (the per-point status and moves are left out)."""
        return {"mode": self.mode, "active": self.active, "reason": self.reason or None, "solver": self.solver or None,
                "points_solved": self.solved, "penalised_points": self.penalised_points,
                "points_optimal": self.optimal, "points_skipped": self.skipped, "seconds": round(self.seconds, 3)}


def inactive(settings: ExactSettings, evidence: MarginEvidence, reason: str) -> tuple[MarginEvidence, MilpReport]:
    status = torch.zeros(len(evidence.labels), len(evidence.radii), dtype=torch.int8)
    return evidence, MilpReport(settings.mode, False, reason, "", 0, 0, 0, 0.0, status, None)


def decisive_points(evidence: MarginEvidence, loss: str, global_slope: float, margin_slope: float,
                    deltas: Sequence[float], p: float) -> tuple[RouteGrowth, list[torch.Tensor]]:
    """The growth curves and, per delta, the grid points (N, K+1) its certificate depends on."""
    growth = growth_curves(evidence, loss, global_slope)
    families = [growth.curves]
    if loss == "margin":
        families.append(margin_class_curves(evidence, margin_slope))
    used = []
    for delta in deltas:
        if delta <= 0:
            used.append(torch.zeros(len(evidence.labels), len(evidence.radii), dtype=torch.bool))
            continue
        bounds = [excess_bound(curves, float(delta), p) for curves in families]
        best = min(range(len(families)), key=lambda k: bounds[k][0])
        used.append(used_points(families[best], float(delta), p, bounds[best][1]))
    return growth, used


def refine_with_milp(evidence: MarginEvidence, network: BoundNetwork | None, x: torch.Tensor, norm: str,
                     box: tuple[float, float] | None, deltas: Sequence[float], p: float, loss: str,
                     global_slope: float, margin_slope: float, settings: ExactSettings,
                     cells: CellAnalysis | None = None, deadline: Deadline = NEVER) -> tuple[MarginEvidence, MilpReport]:
    """Evidence with MILP (or split) bounds at the decisive points, and what was done (see the module doc)."""
    if settings.mode == "off":
        return inactive(settings, evidence, "off")
    if network is None or evidence.linear is None:
        return inactive(settings, evidence, "no bound network")
    auto = settings.mode == "auto"
    if auto and loss not in AUTO_LOSSES:
        return inactive(settings, evidence, f"auto runs for the {' and '.join(AUTO_LOSSES)} losses, whose growth the "
                                             f"worst margin decides (use --exact on for {loss})")

    def default(value, under_auto, under_on):
        return value if value is not None else (under_auto if auto else under_on)

    solver, reason = point_solver(network, x, norm, settings.mode, default(settings.max_unstable, AUTO_MAX_UNSTABLE, None),
                             default(settings.node_limit, AUTO_NODE_LIMIT, None),
                             default(settings.per_milp_seconds, None, 10.0))
    if solver is None:
        return inactive(settings, evidence, reason)
    budget = settings.seconds if settings.seconds is not None else math.inf
    points_left = default(settings.max_points, AUTO_MAX_POINTS, math.inf)
    count, points = len(evidence.labels), len(evidence.radii)
    status = torch.zeros(count, points, dtype=torch.int8)
    milp = torch.full_like(evidence.linear, math.inf)
    inside = _inside_cells(evidence)
    moves: list[list[torch.Tensor]] = [[] for _ in range(count)]
    flat = x.flatten(1)
    began, exhausted = time.perf_counter(), False
    # p < inf, margin: penalised MILPs give the inner sups without interpolating between grid radii
    # (penalty_route), so the grid is not refined at midpoints and keeps a quarter of the budget at most.
    penalised_route = not math.isinf(p) and loss == "margin" and solver.kind == "milp" and settings.penalised
    grid_budget = budget / 4 if penalised_route else budget
    for _ in range(settings.rounds):
        current = replace(evidence, milp=milp)
        _, used = decisive_points(current, loss, global_slope, margin_slope, deltas, p)
        need = torch.stack(used).any(0) & ~inside & (status == NOT_RUN)
        if not need.any():
            new = [] if math.isinf(p) or penalised_route else _midpoints(used, inside | _exact(status),
                                                                          evidence.radii)
            if len(new) == 0 or points_left <= 0:
                break
            evidence, milp, status = _with_radii(evidence, milp, status, network, x, norm, box, cells, new, deadline)
            inside = _inside_cells(evidence)
            continue
        for k in need.any(0).nonzero().flatten().tolist():
            samples = need[:, k].nonzero().flatten()
            deadline.check("the exact MILP route")
            radius = float(evidence.radii[k])
            problem = margin_problem(network, x[samples], evidence.labels[samples], radius, norm, box,
                                     torch.device("cpu"), torch.float64)
            state = propagate(network, problem.region, deadline=deadline)
            for row, i in enumerate(samples.tolist()):
                left = grid_budget - (time.perf_counter() - began)
                if left <= 0 or points_left <= 0:
                    exhausted = True
                    break
                deadline.check("the exact MILP route")
                solution = solver(problem, state, row, evidence.linear[i, k], left)
                if solution is None:  # too large for this mode
                    status[i, k] = SKIPPED
                    continue
                upper, optimal, point, by_split = solution
                points_left -= 1
                milp[i, k] = torch.from_numpy(upper)
                status[i, k] = (SPLIT_EXACT if optimal else SPLIT_BOUND) if by_split else (OPTIMAL if optimal
                                                                                             else AT_LIMIT)
                if point is not None:
                    moves[i].append(project_displacement(torch.from_numpy(point) - flat[i], problem.region.lower[row],
                                                         problem.region.upper[row], radius, norm))
            if exhausted:
                break
        if exhausted:
            status[need & (status == NOT_RUN)] = SKIPPED  # decisive points the budget did not reach
            break
    evidence = replace(evidence, milp=milp)
    penalised, penalised_points = [], 0
    if penalised_route and points_left > 0:
        growth = growth_curves(evidence, loss, global_slope)
        top = margins(evidence.logits, evidence.labels).masked_fill(
            torch.nn.functional.one_hot(evidence.labels, evidence.logits.shape[1]).bool(), -math.inf).max(1).values
        penalised, found, penalised_points, _ = penalised_bounds(
            growth.curves, margin_class_curves(evidence, margin_slope), top, network, x, evidence.labels, norm, box,
            deltas, p, solver, budget - (time.perf_counter() - began), points_left, deadline)
        for i, move in found:
            moves[i].append(move)
    solved = int(((status != NOT_RUN) & (status != SKIPPED)).sum())
    report = MilpReport(settings.mode, True, "", solver.kind, solved, int(_exact(status).sum()),
                        int((status == SKIPPED).sum()), time.perf_counter() - began, status,
                        _stack_moves(moves, flat.shape[1], flat.dtype), tuple(penalised), penalised_points)
    return evidence, report


def _exact(status: torch.Tensor) -> torch.Tensor:
    """Points solved exactly (a MILP at optimality, a complete split)."""
    return (status == OPTIMAL) | (status == SPLIT_EXACT)


def _inside_cells(evidence: MarginEvidence) -> torch.Tensor:
    """Grid points (N, K+1) where an exact route already holds: radius 0 and the samples' cells."""
    inside = torch.zeros(len(evidence.labels), len(evidence.radii), dtype=torch.bool)
    if evidence.cell_radius is not None:
        inside = evidence.radii.unsqueeze(0) <= evidence.cell_radius.unsqueeze(1)
    inside[:, 0] = True
    return inside


def _midpoints(used: list[torch.Tensor], exact: torch.Tensor, radii: torch.Tensor) -> list[float]:
    """Geometric midpoints of the grid intervals that are decisive pieces with exact values at both
    ends: there only the slope bound between the ends keeps the certificate above the truth."""
    new = set()
    for mask in used:
        both = mask[:, :-1] & mask[:, 1:] & exact[:, :-1] & exact[:, 1:]
        for a in both.any(0).nonzero().flatten().tolist():
            low, high = float(radii[a]), float(radii[a + 1])
            if high > low * (1 + 1e-3):
                new.add(math.sqrt(low * high) if low > 0 else high / 2)
    return sorted(new)


def _with_radii(evidence: MarginEvidence, milp: torch.Tensor, status: torch.Tensor, network: BoundNetwork,
                x: torch.Tensor, norm: str, box, cells, new: list[float], deadline: Deadline):
    """The evidence on the grid with `new` radii inserted (their bounds computed for every sample)."""
    extra = collect_evidence(network, x, evidence.labels, evidence.logits, norm,
                             torch.tensor([0.0] + new, dtype=evidence.radii.dtype), box, cells, deadline=deadline,
                             whole_domain=False)
    radii = torch.cat([evidence.radii, extra.radii[1:]])
    order = torch.argsort(radii)

    def merge(old: torch.Tensor | None, added: torch.Tensor | None) -> torch.Tensor | None:
        return None if old is None else torch.cat([old, added[:, 1:]], 1)[:, order]

    merged = replace(evidence, radii=radii[order], linear=merge(evidence.linear, extra.linear),
                     slopes=merge(evidence.slopes, extra.slopes),
                     cell_margins=merge(evidence.cell_margins, extra.cell_margins),
                     cell_rates=merge(evidence.cell_rates, extra.cell_rates),
                     tightened=merge(evidence.tightened, extra.tightened))
    shape = (len(milp), len(new) + 1, milp.shape[2])
    return (merged, merge(milp, torch.full(shape, math.inf, dtype=milp.dtype)),
            merge(status, torch.zeros(shape[:2], dtype=status.dtype)))


def _stack_moves(moves: list[list[torch.Tensor]], width: int, dtype: torch.dtype) -> torch.Tensor | None:
    most = max((len(m) for m in moves), default=0)
    if most == 0:
        return None
    stacked = torch.zeros(len(moves), most, width, dtype=dtype)
    for i, sample in enumerate(moves):
        if sample:
            stacked[i, : len(sample)] = torch.stack(sample)
    return stacked


def curve_sources(growth: RouteGrowth, used: torch.Tensor, status: torch.Tensor,
                  solver: str = "milp") -> dict[str, float]:
    """Share of the samples whose decisive curve point (the farthest one used) came from each route.

    The `milp` route is named by its solver and split into `<solver>_exact` (solved to optimality,
    or a complete split) and `<solver>_bound` (a bound at a limit); samples that gain nothing at this budget count as `unmoved`.
    """
    count = len(used)
    names: list[str] = []
    for i in range(count):
        indices = used[i].nonzero().flatten()
        if len(indices) == 0:
            names.append("unmoved")
            continue
        k = int(indices[-1])
        winner = int(growth.winner[i, k])
        name = ROUTES[winner] if winner >= 0 else "none"
        if name == "milp":
            point = int(status[i, k])
            by = "split" if point in (SPLIT_EXACT, SPLIT_BOUND) else solver
            name = f"{by}_exact" if point in EXACT_STATUS else f"{by}_bound"
        names.append(name)
    values, counts = np.unique(np.array(names), return_counts=True)
    return {str(v): float(c) / count for v, c in zip(values, counts)}
