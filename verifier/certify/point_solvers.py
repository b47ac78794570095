"""The per-point solvers of the exact route (method §8): one (sample, radius) point of a propagated
batch -> per-class upper bounds of its margins, whether they are exact, a maximiser, and whether
branch and bound (not the MILP) gave them. `point_solver` picks the MILP (`exact.milp`), ReLU
splitting (`exact.relu_bab`) or input splitting (`exact.bab`) for the net, threat and mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds.network import Activation, BoundNetwork
from verifier.bounds.propagate import Bounds, InputSet, MarginProblem
from verifier.exact.bab import split_margins
from verifier.exact.beta_crown import DenseNetwork
from verifier.exact.encode import NotEncodable, encode_network
from verifier.exact.margins import sample_intervals
from verifier.exact.milp import MilpLimits, Penalty, solve_margins, unstable_units
from verifier.exact.relu_bab import SPLIT_KINDS, relu_split_margins

AUTO_MAX_UNITS = 512
SPLIT_MAX_INPUTS = 8  # input splitting (any activation the bounds cover) for inputs this small
AUTO_SPLIT_LEAVES = 1024
SPLIT_TOLERANCE = 1e-4
AUTO_RELU_LEAVES = 64  # ReLU splitting under auto, where a point's MILP has too many binaries
RELU_LEAVES = 4096  # ... under split (per point, with per_milp_seconds)


@dataclass(frozen=True)
class PointSolver:
    """One (sample, radius) point -> (per-class upper bounds, optimal, maximiser, by splitting) or None
    (skipped)."""

    kind: str  # "milp" or "split"
    solve: Callable

    def __call__(self, problem: MarginProblem, state: Bounds, row: int, linear: torch.Tensor, seconds: float,
                 penalty: Penalty | None = None):
        if penalty is None:
            return self.solve(problem, state, row, linear, seconds)
        return self.solve(problem, state, row, linear, seconds, penalty)


def point_solver(network: BoundNetwork, x: torch.Tensor, norm: str, mode: str, cap: int | None, node_limit: int | None,
            per_milp: float | None) -> tuple[PointSolver | None, str]:
    """The MILP when the net and threat allow it (ReLU splitting at points whose MILP has more than
    `cap` binaries under auto), ReLU splitting alone under `split`, else input splitting for
    low-dimensional ℓ∞ inputs."""
    reason, auto = "", mode == "auto"
    relu_split = _relu_splitter(network, x, AUTO_RELU_LEAVES if auto else RELU_LEAVES, per_milp)
    if mode == "split":
        return (PointSolver("split", relu_split), "") if relu_split is not None else \
            (None, "ReLU splitting needs ReLU-family units and norm inf or 1")
    if norm in ("inf", "1"):
        try:
            encoded = encode_network(network, tuple(x.shape[1:]))
            if auto and encoded.unit_count > AUTO_MAX_UNITS:
                raise NotEncodable(f"{encoded.unit_count} activation units > {AUTO_MAX_UNITS} (auto)")
        except NotEncodable as err:
            reason = str(err)
        else:
            def milp(problem: MarginProblem, state: Bounds, row: int, linear: torch.Tensor, seconds: float,
                     penalty: Penalty | None = None):
                intervals = sample_intervals(state, row)
                if cap is not None and unstable_units(encoded, intervals) > cap:
                    # Too many binaries for this mode: ReLU splitting (not for the penalised objective).
                    if penalty is None and auto and relu_split is not None:
                        return relu_split(problem, state, row, linear, seconds)
                    return None
                region = problem.region
                solution = solve_margins(encoded, region.center[row].flatten().numpy(), int(problem.labels[row]),
                                         region.lower[row].numpy(), region.upper[row].numpy(),
                                         float(region.radius[row]), norm, intervals, linear.numpy(),
                                         MilpLimits(time_limit=least(per_milp, seconds), node_limit=node_limit),
                                         penalty)
                return solution.upper, solution.optimal, solution.point, False

            return PointSolver("milp", milp), ""
    else:
        reason = f"the ℓ{norm} ball is not polyhedral (the MILP needs norm inf or 1)"
    width = int(np.prod(x.shape[1:]))
    if norm == "inf" and width <= SPLIT_MAX_INPUTS:
        leaves = AUTO_SPLIT_LEAVES if auto else 16 * AUTO_SPLIT_LEAVES

        def split(problem: MarginProblem, state: Bounds, row: int, linear: torch.Tensor, seconds: float):
            region = problem.region
            centre, radius = region.center[row].flatten(), float(region.radius[row])
            low = centre + torch.clamp(region.lower[row], min=-radius)
            high = centre + torch.clamp(region.upper[row], max=radius)
            solution = split_margins(network, centre, int(problem.labels[row]), low, high, tolerance=SPLIT_TOLERANCE,
                                     max_leaves=leaves)
            return np.minimum(solution.upper, linear.numpy()), solution.complete, solution.point, False

        return PointSolver("split", split), ""
    return None, reason + (f"; input splitting needs norm inf and at most {SPLIT_MAX_INPUTS} inputs" if reason else "")


def _relu_splitter(network: BoundNetwork, x: torch.Tensor, leaves: int, per_point: float | None) -> Callable | None:
    """ReLU splitting (`exact.relu_bab`) at one point, or None when the net has no ReLU-family unit."""
    if not any(isinstance(n.rule, Activation) and n.rule.kind in SPLIT_KINDS for n in network.nodes):
        return None
    try:
        dense = DenseNetwork.of(encode_network(network, tuple(x.shape[1:])))
    except NotEncodable:
        dense = None  # plain interval splits (MaxPool and other non-encodable nodes)

    def split(problem: MarginProblem, state: Bounds, row: int, linear: torch.Tensor, seconds: float):
        region = problem.region
        one = InputSet(region.center[row:row + 1], region.radius[row:row + 1], region.norm,
                       region.lower[row:row + 1], region.upper[row:row + 1])
        solution = relu_split_margins(network, one, int(problem.labels[row]), tolerance=SPLIT_TOLERANCE,
                                      max_leaves=leaves, seconds=least(per_point, seconds), dense=dense)
        return (np.minimum(solution.upper.numpy(), linear.numpy()), solution.complete, solution.point.numpy(),
                True)

    return split


def least(*limits: float | None) -> float | None:
    finite = [v for v in limits if v is not None and math.isfinite(v)]
    return min(finite) if finite else None
