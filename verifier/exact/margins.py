"""`milp_margins`: exact worst margins of a batch of samples at one radius (bounds, then one MILP each)."""

from __future__ import annotations

import math

import numpy as np
import torch

from verifier.bounds.margins import margins_from
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import Bounds, margin_problem, propagate
from verifier.exact.encode import EncodedNetwork, encode_network
from verifier.exact.milp import MarginSolution, MilpLimits, solve_margins


def sample_intervals(state: Bounds, row: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The flattened interval of every tensor for sample `row` of a propagated state (MILP bounds)."""
    return {name: (low[row].flatten().numpy(), high[row].flatten().numpy())
            for name, (low, high) in state.intervals.items()}


def milp_margins(network: BoundNetwork, x: torch.Tensor, y: torch.Tensor, radius: float, norm: str,
                 box: tuple[float, float] | None, limits: MilpLimits = MilpLimits(),
                 encoded: EncodedNetwork | None = None) -> list[MarginSolution]:
    """One `MarginSolution` per sample over `B(x_i, radius) ∩ box` (float64, CPU)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    encoded = encoded or encode_network(network, tuple(x.shape[1:]))
    problem = margin_problem(network, x, y, radius, norm, box, torch.device("cpu"), torch.float64)
    state = propagate(network, problem.region)
    linear = margins_from(problem, state).upper.masked_fill(problem.true_class, -math.inf)
    flat = x.flatten(1)
    return [solve_margins(encoded, flat[i].numpy(), int(problem.labels[i]), problem.region.lower[i].numpy(),
                          problem.region.upper[i].numpy(), float(radius), norm, sample_intervals(state, i),
                          linear[i].numpy(), limits)
            for i in range(len(x))]
