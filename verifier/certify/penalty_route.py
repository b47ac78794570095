"""The W_p dual's inner sup by penalised MILPs (method §8): what the grid cannot give between its radii.

For `p < inf` the certificate is `lam delta^p + mean_i sup_rho (g_i(rho) - lam rho^p)` and the
grid bounds `g_i` between its radii only through a slope bound, so the sup sits at a kink above
any realisable point. At the dual's `lam` (per delta, from the grid), each sample whose sup is
attained on a piece `[s_(k-1), s_k]` beyond its cell gets one MILP per class over `B(x_i, s_k) ∩ X`
with the objective `z_j - z_y - lam ||x - x_i||^p` (`exact.milp.Penalty`): a sound upper bound on
`sup_{rho <= s_k} (g_i(rho) - lam rho^p)`, exact at optimality (no interpolation at all), and its
maximiser is a realisable move. Pieces beyond `s_k` keep the grid's bound (`aggregate.penalised_excess`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import margin_problem, propagate
from verifier.certify.aggregate import (GrowthCurves, PenalisedBound, beyond_penalised, decisive_piece, excess_bound,
                                       golden_minimum, penalised_excess, row_sups, sample_piece_sups)
from verifier.deadline import NEVER, Deadline
from verifier.exact.milp import Penalty, project_displacement
from verifier.geometry import vector_norm


LAMBDA_ROUNDS = 6  # lam per delta: the grid's, then the minimiser of the dual of the maximisers found
STOP_GAP = 2e-4  # ... until the certificate is this close (relative) to the model's least dual value
EXTENSIONS = 3  # re-solves per delta over a larger ball when a farther piece still beats the MILP's value


def penalised_bounds(curves: GrowthCurves, class_curves: GrowthCurves, top: torch.Tensor, network: BoundNetwork,
                     x: torch.Tensor, labels: torch.Tensor, norm: str, box: tuple[float, float] | None,
                     deltas: Sequence[float], p: float, solve: Callable, seconds: float,
                     points: float, deadline: Deadline = NEVER) -> tuple[list[PenalisedBound], list, int, int]:
    """One `PenalisedBound` per delta > 0, the maximisers found `(sample, radius, point)`, MILP points
    solved and of them optimal.

    `curves`/`class_curves`: the margin growth (both families); `top`: each sample's clean margin
    loss; `solve(problem, state, row,
    linear, seconds, penalty)` -> (per-class upper bounds, optimal, point) or None (too large);
    `seconds` and `points` cap the work (total). The ball of a sample's MILP ends at its decisive
    piece; where a farther piece of the grid still has a larger sup than the MILP's value, the MILP
    is solved again up to that piece (the whole box for the tail piece), `EXTENSIONS` times at most.
    """
    work = _Work(time.perf_counter() + seconds, points, len(labels))
    families, bounds = [curves, class_curves], []
    count = len(labels)
    # Per delta: its current lam and best dual value; the rounds go over every delta in turn, so a
    # budget that runs out leaves every delta with at least its first rounds.
    open_deltas = {}
    for delta in deltas:
        lam = min((excess_bound(f, float(delta), p) for f in families), key=lambda r: r[0])[1] if delta > 0 else 0.0
        if 0 < lam < math.inf:
            open_deltas[float(delta)] = (lam, math.inf)
    for _ in range(LAMBDA_ROUNDS):
        for delta, (lam, best) in list(open_deltas.items()):
            if work.spent():
                break
            bound = PenalisedBound(lam, torch.zeros(count, dtype=torch.long),
                                   torch.full((count,), -math.inf, dtype=curves.radii.dtype))
            piece = torch.stack([decisive_piece(f, lam, p) for f in families]).max(0).values
            target = torch.where(piece >= 0, piece + 1, torch.zeros_like(piece))
            target = torch.where(_tight(families, work.points, lam, p), torch.zeros_like(target), target)
            for _ in range(EXTENSIONS):
                wanted = target > bound.first
                if not wanted.any() or work.spent():
                    break
                bound = _solve_at(bound, target, wanted, curves, class_curves, top, network, x, labels, norm, box, p,
                                  solve, work, deadline)
                target = _farther_piece(bound, families, p)
            bounds.append(bound)
            best = min(best, penalised_excess(bound, families, delta, p))
            model, following = _next_lambda(work.points, lam, delta, p)
            if best - model <= STOP_GAP * max(1.0, abs(best)):
                del open_deltas[delta]
            else:
                open_deltas[delta] = (following, best)
    return bounds, work.found, work.solved, work.optimal


def _tight(families: list[GrowthCurves], points: list[list[tuple[float, float]]], lam: float, p: float) -> torch.Tensor:
    """Samples (N,) whose grid inner sup at `lam` is already met by a maximiser found (or by not moving):
    no MILP can lower their term."""
    grid = torch.stack([sample_piece_sups(f, lam, p).max(1).values for f in families]).min(0).values.clamp_min(0.0)
    found = torch.tensor([max([0.0] + [g - lam * d**p for d, g in sample]) for sample in points], dtype=grid.dtype)
    return grid - found <= STOP_GAP * torch.clamp(grid.abs(), min=1.0)


def _next_lambda(points: list[list[tuple[float, float]]], lam: float, delta: float, p: float) -> tuple[float, float]:
    """The least dual value of the maximisers found so far and its `lam`, within a factor 20 of `lam`
    (Kelley's cutting planes in 1-D): realisable points, so their dual is below the true one and
    its minimum bounds what another round could still gain."""
    distance = [torch.tensor([0.0] + [d for d, _ in found], dtype=torch.float64) ** p for found in points]
    gain = [torch.tensor([0.0] + [g for _, g in found], dtype=torch.float64) for found in points]

    def dual(value: float) -> float:
        return value * delta**p + sum(float((g - value * d).max()) for g, d in zip(gain, distance)) / len(gain)

    return golden_minimum(dual, math.log(lam / 20.0), math.log(lam * 20.0), 40)


class _Work:
    """The route's budget and tallies (one per call)."""

    def __init__(self, until: float, points: float, count: int) -> None:
        self.until, self.points_left = until, points
        self.found: list[tuple[int, torch.Tensor]] = []  # (sample, displacement) of every maximiser
        self.points: list[list[tuple[float, float]]] = [[] for _ in range(count)]  # their (distance, gain)
        self.solved = self.optimal = 0

    def spent(self) -> bool:
        return time.perf_counter() >= self.until or self.points_left <= 0


def _farther_piece(bound: PenalisedBound, families: list[GrowthCurves], p: float) -> torch.Tensor:
    """Per sample, one past the farthest piece beyond `first` whose grid sup still beats the MILP's value
    (the family that bounds the beyond part best); `first` where there is none."""
    sups = torch.stack([sample_piece_sups(f, bound.lam, p) for f in families])  # (F, N, K+1)
    index = torch.arange(sups.shape[2])
    early = index[None, None, :] < bound.first[None, :, None]
    masked = sups.masked_fill(early, -math.inf)
    family = masked.max(2).values.argmin(0)  # the family giving the least beyond-bound
    chosen = masked[family, torch.arange(sups.shape[1])]
    beats = chosen > (bound.value + 1e-9 * (1 + bound.value.abs()))[:, None]
    farthest = torch.where(beats, index[None, :], torch.full_like(chosen, -1, dtype=torch.long)).max(1).values
    return torch.where(farthest >= 0, farthest + 1, bound.first)


def _solve_at(bound: PenalisedBound, target: torch.Tensor, wanted: torch.Tensor, curves: GrowthCurves,
              class_curves: GrowthCurves, top: torch.Tensor, network: BoundNetwork, x: torch.Tensor,
              labels: torch.Tensor, norm: str, box, p: float, solve: Callable, work: _Work,
              deadline: Deadline) -> PenalisedBound:
    """`bound` with the penalised MILPs of the `wanted` samples over the balls up to `radii[target_i]`
    (their reach for the tail, `target = K+1`)."""
    first, value = bound.first.clone(), bound.value.clone()
    classes, grid, last = class_curves.groups + 1, curves.radii, len(curves.radii) - 1
    others = ~torch.nn.functional.one_hot(labels, classes).bool()
    # Sound per-class caps: the grid's own bound of each class's sup below the ball's radius.
    class_sups = row_sups(class_curves, bound.lam, p, torch.zeros_like(target), target).reshape(len(labels), -1)
    radius_of = torch.where(target > last, curves.reach, grid[target.clamp_max(last)])
    for radius in radius_of[wanted].unique().tolist():
        samples = (wanted & (radius_of == radius)).nonzero().flatten()
        deadline.check("the penalised MILP route")
        problem = margin_problem(network, x[samples], labels[samples], radius, norm, box, torch.device("cpu"),
                                 torch.float64)
        state = propagate(network, problem.region, deadline=deadline)
        for row, i in enumerate(samples.tolist()):
            if work.spent():
                return PenalisedBound(bound.lam, first, value)
            deadline.check("the penalised MILP route")
            linear = torch.full((classes,), -math.inf, dtype=grid.dtype)
            linear[others[i]] = class_sups[i] + top[i]
            solution = solve(problem, state, row, linear, work.until - time.perf_counter(), Penalty(bound.lam, p))
            if solution is None:
                continue
            upper, is_optimal, point, _ = solution
            work.points_left -= 1
            work.solved, work.optimal = work.solved + 1, work.optimal + int(is_optimal)
            first[i], value[i] = target[i], float(upper.max()) - float(top[i])
            if point is not None:
                region = problem.region
                move = project_displacement(torch.from_numpy(point) - x[i].flatten(), region.lower[row],
                                            region.upper[row], radius, norm)
                with torch.no_grad():
                    logits = network.evaluate((x[i].flatten() + move).reshape(1, *x.shape[1:]))[0]
                gain = float((logits - logits[labels[i]]).masked_fill(~others[i], -math.inf).max() - top[i])
                work.found.append((i, move))
                work.points[i].append((vector_norm(move[None], norm).item(), gain))
    return PenalisedBound(bound.lam, first, value)


def penalised_sources(bound: PenalisedBound, families: list[GrowthCurves], p: float) -> dict[str, float]:
    """Share of the samples whose inner sup came from the penalised MILP (`milp_penalised`), from the
    grid beyond it (`grid`), or that gain nothing (`unmoved`)."""
    beyond = beyond_penalised(bound, families, p)
    best = torch.maximum(bound.value, beyond)
    penalised = ((bound.value >= beyond) & (best > 0)).double().mean()
    unmoved = (best <= 0).double().mean()
    shares = {"milp_penalised": float(penalised), "grid": float(1 - penalised - unmoved), "unmoved": float(unmoved)}
    return {name: share for name, share in shares.items() if share > 0}
