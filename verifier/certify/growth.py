"""Per-sample upper growth functions on a radius grid: the minimum over the sound routes (§3).

Routes, each sound on `B(x_i, s) ∩ box` (inf where it does not apply):
- `cell`: the exact in-cell LP while `s <= r_i` (piecewise-linear models);
- `linear`: back-substituted margin bounds `UB_j(s)` turned into the loss;
- `jacobian`: the upper Riemann sum of slope bounds, `sum_{m<=k} Lambda(s_m) (s_m - s_{m-1})`;
- `global`: `Lip(loss) * s`;
- `milp`: the exact worst margins of the MILP (`verifier.exact`, where it ran), or its dual bound
  when it stopped at a limit.
The minimum is made non-decreasing from the right (`g(s_k) <= g(s_m) <= gbar(s_m)` for m > k),
which is sound and only tightens. Which route won is kept per sample and radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from verifier.allocator import trim_heaps
from verifier.bounds.margins import margins_from
from verifier.bounds.network import BoundNetwork
from verifier.bounds.optimise import SlopeSearch
from verifier.bounds.propagate import Bounds, margin_problem, propagate
from verifier.bounds.slopes import slopes_from
from verifier.cells import CellAnalysis
from verifier.certify.aggregate import GrowthCurves
from verifier.deadline import NEVER, Deadline, Stopped, Terminated
from verifier.losses import loss_values, margins
from verifier.resources import memory_limit

ROUTES = ("cell", "linear", "jacobian", "global", "milp")


@dataclass(frozen=True)
class RouteGrowth:
    """The combined curves, each route's values (N, K+1), and the winning route index per point."""

    curves: GrowthCurves
    by_route: dict[str, torch.Tensor]
    winner: torch.Tensor
    clean_loss: torch.Tensor  # (N,)


def loss_from_margins(class_margins: torch.Tensor, loss: str) -> torch.Tensor:
    """Upper bound on the loss from upper bounds on every margin `z_j - z_y` (-inf at j = y)."""
    worst = class_margins.max(-1).values
    if loss == "margin":
        return worst
    if loss == "zero_one":
        return (worst >= 0).to(class_margins.dtype)
    # CE = log(1 + sum_{j != y} exp(z_j - z_y)), increasing in every margin.
    return torch.nn.functional.softplus(torch.logsumexp(class_margins, dim=-1))


def box_reach(x: torch.Tensor, box: tuple[float, float] | None, norm: str) -> torch.Tensor:
    """`D_i = max over the box of ||x - x_i||` (inf without a box)."""
    flat = x.flatten(1)
    if box is None:
        return torch.full((len(flat),), math.inf, dtype=flat.dtype, device=flat.device)
    far = torch.maximum(flat - box[0], box[1] - flat)
    return torch.linalg.vector_norm(far, {"inf": math.inf, "2": 2.0, "1": 1.0}[norm], dim=1)


@dataclass(frozen=True)
class MarginEvidence:
    """Loss-independent bounds on one radius grid, collected once and shared by every loss."""

    radii: torch.Tensor  # (K+1,)
    logits: torch.Tensor  # (N, C)
    labels: torch.Tensor  # (N,)
    linear: torch.Tensor | None  # (N, K+1, C): upper bounds of z_j - z_y, -inf at j = y
    slopes: torch.Tensor | None  # (N, K+1, C): Jacobian-route bound on each margin's slope on each ball
    whole_box: torch.Tensor | None  # (N, C): margin upper bounds over the whole box (all of R^d without one)
    domain_slope: torch.Tensor | None  # (N, C): slope bounds over the whole box (or all of R^d)
    cell_margins: torch.Tensor | None  # (N, K+1, C): exact in-cell margins (valid up to the radius)
    cell_rates: torch.Tensor | None  # (N, K+1, C): their supergradients in s (tangents, concave in-cell)
    cell_radius: torch.Tensor | None  # (N,)
    reach: torch.Tensor  # (N,): D_i
    tightened: torch.Tensor | None = None  # (N, K+1) bool: point bounded with tightened intermediate intervals
    notes: tuple[str, ...] = ()  # what a time or memory limit cut short
    milp: torch.Tensor | None = None  # (N, K+1, C): MILP margin bounds where it ran (inf elsewhere, -inf at j = y)

    def milp_ran(self) -> torch.Tensor:
        """Grid points (N, K+1) with MILP margin bounds."""
        if self.milp is None:
            return torch.zeros(self.radii.shape[0], dtype=torch.bool).expand(len(self.labels), -1)
        return (self.milp < math.inf).any(-1)


def _bounds_at(network: BoundNetwork, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor | float, norm: str,
               box: tuple[float, float] | None, device: str | torch.device, deadline: Deadline, tighten: bool,
               prior: Bounds | None = None, optimise: SlopeSearch | None = None):
    """Margin upper bounds (-inf at the true class), per-class slope bounds and the propagated state."""
    problem = margin_problem(network, x, y, radius, norm, box, torch.device(device), x.dtype)
    state = propagate(network, problem.region, tighten=tighten, deadline=deadline, prior=prior,
                      margins_only=optimise is None)  # the state feeds the margins and slopes (and the next prior)
    bounds = margins_from(problem, state, deadline, optimise).upper.masked_fill(problem.true_class, -math.inf)
    return bounds, slopes_from(problem, state, deadline).per_class, state


# Bytes per node value per sample kept by one propagation: the interval (2), an activation's four
# relaxation lines, the slope pass's intervals, and the tightened copy of the previous radius.
_COPIES_PER_UNIT = 10
# The slope pass carries interval pairs of the gradients backwards (the pending pair, the incoming
# one and the rule's temporaries, a MaxPool's per tap) of the widest tensor, per objective row;
# the margin and slope passes take as many rows at once as `propagate.ROW_ELEMENTS` allows, at least one.
_SLOPE_COPIES = 6
# Passes at least this large hand the heaps' free pages back after them: their tensors, each below
# the allocator's mmap threshold, fragment the heaps otherwise (tumor-vgg16's resident memory grew
# 3.2 -> 4.6 GB over certify's one-sample passes; docs/benchmarks.md, session 7).
_TRIM_AFTER_BYTES = 256 << 20


def samples_per_pass(network: BoundNetwork, x: torch.Tensor, memory_limit_bytes: int | None) -> int:
    """How many samples one propagation and the slope pass behind it (one objective row at a time at
    least, while the propagation's intervals are held) may hold under the memory limit (half of it;
    at least one)."""
    return _samples_fitting(_bytes_per_sample(network, x), memory_limit_bytes)


def _samples_fitting(bytes_per_sample: int, memory_limit_bytes: int | None) -> int:
    return max(1, memory_limit(memory_limit_bytes) // 2 // max(bytes_per_sample, 1))


def _bytes_per_sample(network: BoundNetwork, x: torch.Tensor) -> int:
    sizes = network.value_sizes(x)
    interval_pass = sum(sizes.values()) * _COPIES_PER_UNIT
    slope_pass = network.widest_backward(sizes) * _SLOPE_COPIES
    return (interval_pass + slope_pass) * x.element_size()


def collect_evidence(network: BoundNetwork | None, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                     norm: str, radii: torch.Tensor, box: tuple[float, float] | None,
                     cells: CellAnalysis | None = None, device: str | torch.device = "cpu", progress: bool = False,
                     deadline: Deadline = NEVER, memory_limit_bytes: int | None = None,
                     whole_domain: bool = True, optimise: SlopeSearch | None = None) -> MarginEvidence:
    """Margin and slope bounds at every grid radius and on the whole domain, coarse to fine (anytime).

    First the cheap pass: the margins back-substituted through relaxations of interval bounds
    (CROWN-IBP), on the whole domain and at every radius (coarse to fine over the grid). Then the
    tight pass: intermediate intervals tightened by back-substitution, from the largest radius down
    (each ball contains the next, so its intervals seed the next propagation), the whole domain
    last. Each point keeps the smaller of its bounds. The propagations run on `device` (that of
    `network`'s constants); the tables are kept on the CPU. Samples go in chunks that fit half of
    `memory_limit_bytes` (default `resources.memory_limit()`); where one sample does not, there are
    no linear bounds (a note says so), as without a network. Past `deadline` the pass in progress
    ends where it is (`notes` say how far the tight pass got): a point without a tight bound keeps
    its cheap one, and is also capped by every larger radius. A signal (`Terminated`) still stops
    everything. `whole_domain=False` skips the whole-domain passes (`whole_box`, `domain_slope`
    None), for a caller that only adds radii to evidence it has. `optimise`: the tight pass's margins
    also search the relaxations' free slopes (`verifier.bounds.optimise`, alpha-CROWN style).
    """
    linear = slopes = whole_box = domain_slope = tightened = None
    notes: list[str] = []
    if network is not None:
        needed, allowed = _bytes_per_sample(network, x.to(radii.dtype)), memory_limit(memory_limit_bytes) // 2
        if needed > allowed:  # one sample is the smallest pass: it cannot be cut to fit
            notes.append(f"memory limit: one sample's bound pass needs about {needed / 2**30:.2g} GiB, over "
                         f"the {allowed / 2**30:.2g} GiB (half the memory limit) it may take: no linear bounds")
            network = None
    if network is not None:
        x = x.to(radii.dtype)
        count, points, classes = len(x), len(radii), logits.shape[1]
        true_class = torch.nn.functional.one_hot(y, classes).bool()
        linear = torch.full((count, points, classes), math.inf, dtype=radii.dtype)
        slopes = torch.full_like(linear, math.inf)
        linear[:, 0], slopes[:, 0] = margins(logits, y).masked_fill(true_class, -math.inf), 0.0
        tightened = torch.zeros(count, points, dtype=torch.bool)
        tightened[:, 0] = True
        domain = torch.full((count, classes), math.inf, dtype=radii.dtype)
        domain_slopes = torch.full_like(domain, math.inf)
        step = _samples_fitting(needed, memory_limit_bytes)
        parts = [slice(start, min(start + step, count)) for start in range(0, count, step)]
        large_passes = min(step, count) * needed >= _TRIM_AFTER_BYTES

        def bound(part: slice, index: int | None, tighten: bool, prior: Bounds | None = None) -> Bounds:
            radius = math.inf if index is None else radii[index]
            bounds, slope, state = _bounds_at(network, x[part], y[part], radius, norm, box, device, deadline,
                                              tighten=tighten, prior=prior, optimise=optimise if tighten else None)
            bounds, slope = bounds.to(linear.device), slope.to(linear.device)  # the tables stay on the CPU
            if index is None:
                domain[part] = torch.minimum(domain[part], bounds)
                domain_slopes[part] = torch.minimum(domain_slopes[part], slope)
            else:
                linear[part, index] = torch.minimum(linear[part, index], bounds)
                slopes[part, index] = torch.minimum(slopes[part, index], slope)
                tightened[part, index] |= tighten
            if large_passes:
                trim_heaps()
            return state

        try:
            # Coarse to fine over the grid (the largest radius, then every 2^j-th point), so that a cut
            # leaves bounds spread over it; a radius not reached is capped by every larger one.
            spread = sorted(range(1, points), key=lambda k: (k != points - 1, -(k & -k), -k))
            domain_pass = [None] if whole_domain else []
            for index in domain_pass + spread:
                for part in parts:
                    deadline.check("the interval bounds per radius")
                    bound(part, index, tighten=False)
            work = [(part, index) for part in parts for index in [*range(points - 1, 0, -1), *domain_pass]]
            state = None
            for part, index in tqdm(work, desc="certify: bounds per radius", unit="radius", disable=not progress,
                                    leave=False):
                deadline.check("the bounds per radius")
                state = bound(part, index, tighten=True, prior=state if index is not None and index < points - 1
                              else None)
        except Stopped as err:
            if isinstance(err, Terminated):
                raise
            done, total = int(tightened[:, 1:].sum()), count * (points - 1)
            notes.append(f"time limit: tightened bounds at {done} of {total} (sample, radius) points"
                         + ("" if done else ", interval-based bounds elsewhere"))
        linear.masked_fill_(true_class.unsqueeze(1), -math.inf)
        domain.masked_fill_(true_class, -math.inf)
        finite = torch.isfinite(domain_slopes).any() or torch.isfinite(domain).any()
        domain_slope = domain_slopes if finite else None
        if finite:  # over the box, or all of R^d without one (a LayerNorm bounds what follows it)
            whole_box = torch.nan_to_num(domain, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return with_cells(MarginEvidence(
        radii=radii, logits=logits, labels=y, linear=linear, slopes=slopes, whole_box=whole_box,
        domain_slope=domain_slope, cell_margins=None, cell_rates=None, cell_radius=None,
        reach=box_reach(x, box, norm), tightened=tightened, notes=tuple(notes),
    ), cells)


def with_cells(evidence: MarginEvidence, cells: CellAnalysis | None) -> MarginEvidence:
    """The evidence with the exact in-cell margins of `cells` added (unchanged for None)."""
    if cells is None:
        return evidence
    return replace(evidence, cell_margins=cells.class_margins(evidence.radii),
                   cell_rates=cells.class_margin_rates(evidence.radii), cell_radius=cells.radius)


def _loss_slope(class_slopes: torch.Tensor, class_margins: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Slope bound of the loss from per-class margin slopes `Lambda_j` (0 at j = y) on a set.

    Margin: `max_j Lambda_j`. CE = log(1 + sum_j exp(m_j)) has `dCE/dm_j = exp(m_j) / (1 + sum_k
    exp(m_k))`, at most 1 in total and at most `exp(UB_j)` each, so its slope on the set is at most
    `min(max_j Lambda_j, sum_j min(1, exp(UB_j)) Lambda_j)` — small for confidently classified samples.
    """
    steepest = class_slopes.max(-1).values
    if loss != "ce" or class_margins is None:
        return steepest
    weights = torch.exp(class_margins.clamp_max(0.0))  # exp(-inf) = 0 at the true class
    weighted = (weights * torch.where(weights > 0, class_slopes, torch.zeros_like(class_slopes))).sum(-1)
    return torch.minimum(steepest, weighted)


def growth_curves(evidence: MarginEvidence, loss: str, global_slope: float) -> RouteGrowth:
    """Upper growth of `loss` for every sample on the evidence's grid, minimum over the routes."""
    radii = evidence.radii
    count, points = len(evidence.labels), len(radii)
    if loss == "zero_one":
        global_slope = math.inf  # the error indicator has no Lipschitz constant
    clean = loss_values(evidence.logits, evidence.labels, loss)
    inf = torch.full((count, points), math.inf, dtype=radii.dtype, device=radii.device)
    routes = {name: inf.clone() for name in ROUTES}
    slopes = torch.full((count, points), global_slope, dtype=radii.dtype, device=radii.device)
    tail_slope = torch.full((count,), global_slope, dtype=radii.dtype, device=radii.device)
    if loss != "zero_one" and evidence.domain_slope is not None:
        whole = evidence.whole_box if loss == "ce" else None
        tail_slope = torch.minimum(tail_slope, _loss_slope(evidence.domain_slope, whole, loss))
        slopes = torch.minimum(slopes, tail_slope.unsqueeze(1))
    if math.isfinite(global_slope):
        routes["global"] = global_slope * radii.expand(count, -1)
    if evidence.cell_margins is not None:
        inside = radii.unsqueeze(0) <= evidence.cell_radius.unsqueeze(1)
        exact = loss_from_margins(evidence.cell_margins, loss) - clean.unsqueeze(1)
        routes["cell"] = torch.where(inside, exact, inf)
    if evidence.linear is not None:
        routes["linear"] = loss_from_margins(evidence.linear, loss) - clean.unsqueeze(1)
        if loss != "zero_one" and evidence.slopes is not None:
            slopes = torch.minimum(slopes, _loss_slope(evidence.slopes, evidence.linear, loss))
            steps = torch.diff(radii, prepend=radii[:1])
            routes["jacobian"] = torch.cumsum(slopes * steps, 1)  # upper Riemann sum, §3.4
    if evidence.milp is not None:
        capped = torch.minimum(evidence.milp, evidence.linear) if evidence.linear is not None else evidence.milp
        routes["milp"] = torch.where(evidence.milp_ran(), loss_from_margins(capped, loss) - clean.unsqueeze(1), inf)
    for values in routes.values():
        values[:, 0] = 0.0
    stacked = torch.stack([routes[name] for name in ROUTES])  # (R, N, K+1)
    best, winner = stacked.min(0)
    tie = evidence.milp_ran() & (routes["milp"] <= best)
    winner = torch.where(tie, ROUTES.index("milp"), winner)  # a tie: the exact route gets it
    winner = torch.where(torch.isfinite(best), winner, torch.full_like(winner, -1))  # -1: no route applies
    best = torch.flip(torch.cummin(torch.flip(best, [1]), 1).values, [1]).clamp_min(0.0)
    if loss == "zero_one":
        tail = 1.0 - clean
    elif evidence.whole_box is not None:
        tail = loss_from_margins(evidence.whole_box, loss) - clean
    else:
        tail = torch.full((count,), math.inf, dtype=radii.dtype)
    curves = GrowthCurves(radii=radii, values=best, slopes=slopes, reach=evidence.reach,
                          tail=torch.maximum(tail, best[:, -1]),
                          tail_slope=tail_slope)
    return RouteGrowth(curves=curves, by_route=routes, winner=winner, clean_loss=clean)


def margin_class_curves(evidence: MarginEvidence, global_slope: float) -> GrowthCurves:
    """Margin growth kept per wrong class j (one row each, `groups = C - 1`): `ubar_j - max_j m_j`.

    Each class gets its own value and slope bounds (exact in-cell values with their tangents,
    linear bounds, the class's Jacobian-route slope), so between grid points the growth follows the
    classes that can actually win instead of the steepest one; on a linear model this is exact.
    """
    radii, logits, labels = evidence.radii, evidence.logits, evidence.labels
    count, classes = logits.shape
    others = ~torch.nn.functional.one_hot(labels, classes).bool()
    base = margins(logits, labels)
    top = base.masked_fill(~others, -math.inf).max(1).values
    shape = (count, len(radii), classes)
    slope = torch.full(shape, global_slope, dtype=radii.dtype, device=radii.device)
    if evidence.domain_slope is not None:
        slope = torch.minimum(slope, evidence.domain_slope.unsqueeze(1))
    tail_slope = slope[:, -1].clone()
    if evidence.slopes is not None:
        slope = torch.minimum(slope, evidence.slopes)
    steps = torch.diff(radii, prepend=radii[:1])[None, :, None]
    upper = base.unsqueeze(1) + torch.cumsum(torch.where(steps > 0, slope * steps, torch.zeros_like(slope)), 1)
    if evidence.linear is not None:
        upper = torch.minimum(upper, evidence.linear)
    if evidence.milp is not None:
        upper = torch.minimum(upper, evidence.milp)
    if evidence.cell_margins is not None:
        inside = (radii.unsqueeze(0) <= evidence.cell_radius.unsqueeze(1)).unsqueeze(-1)
        upper = torch.where(inside, torch.minimum(upper, evidence.cell_margins), upper)
        # The piece ending at s_k lies in the cell when s_k <= r_i: the tangent at s_{k-1} bounds it.
        tangent = torch.cat([slope[:, :1], evidence.cell_rates[:, :-1]], 1)
        slope = torch.where(inside, torch.minimum(slope, tangent), slope)
    upper = torch.flip(torch.cummin(torch.flip(upper, [1]), 1).values, [1])
    growth = upper - top[:, None, None]

    def rows(values: torch.Tensor) -> torch.Tensor:  # (N, K+1, C) -> (N * (C-1), K+1)
        return values.permute(0, 2, 1)[others]

    values = rows(growth)
    tail = (evidence.whole_box - top[:, None])[others] if evidence.whole_box is not None else \
        torch.full((len(values),), math.inf, dtype=radii.dtype)
    return GrowthCurves(radii=radii, values=values, slopes=rows(slope),
                        reach=evidence.reach.repeat_interleave(classes - 1),
                        tail=torch.maximum(tail, values[:, -1]), tail_slope=tail_slope[others], groups=classes - 1)
__all__ = ["ROUTES", "MarginEvidence", "RouteGrowth", "Stopped", "box_reach", "collect_evidence", "growth_curves",
           "loss_from_margins", "margin_class_curves", "with_cells"]
