"""A lower bound on a LayerNorm variance by Cauchy–Schwarz along the clean direction (method eq. 3.8f).

`v = mean_k(c_k²) + eps` over a group of n entries of the centred input c. For any fixed w ≠ 0,
`Σ_k c_k² ≥ <w, c>² / ||w||²`, so a linear bound `<w, c> ∈ [L, U]` over the input set (by
back-substitution) gives `v ≥ dist(0, [L, U])² / (n ||w||²) + eps`. With w the clean centred
vector c(x0) this is the best tangent-plane lower bound of `Σ c_k²` in that direction (the tangent
at `a·c(x0)` with `a = L / ||w||²`), and it stays positive as long as c keeps a component along
its clean direction, where the interval-of-squares bound has long reached 0 (`eps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.bounds import ops

_EPS64 = torch.finfo(torch.float64).eps

# `bound(node, coefficients (N, K, *node shape)) -> (N, K)`: sound upper bounds of <coefficients_k, node>.
UpperBound = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class MeanSquare(ops.Affine):
    """`v = mean(q) + eps` over the last `dims` axes, where q (its input) is the elementwise square
    of a centred node (the variance of a decomposed LayerNorm)."""

    dims: int = 1


def variance_floor(rule: MeanSquare, centred: str, clean: Tensor, bound: UpperBound, element_budget: int) -> Tensor:
    """A sound lower bound on the variance node (N, *lead, 1, …) from the clean values `clean`
    (N, *lead, *group) of the `centred` node and `bound` (back-substitution to it); `element_budget`
    caps the coefficients built at once (objectives are chunked)."""
    dtype, clean = clean.dtype, clean.to(torch.float64)  # objectives in the bounds' dtype, the floor in float64
    count, lead, group = clean.shape[0], clean.shape[1:clean.dim() - rule.dims], clean.shape[clean.dim() - rule.dims:]
    rows, size = math.prod(lead), math.prod(group)
    direction = clean.reshape(count, rows, size).to(dtype).to(torch.float64)  # w exactly as the objectives hold it
    device = clean.device
    lower = torch.empty(count, rows, dtype=torch.float64, device=device)
    upper = torch.empty_like(lower)
    chunk = max(1, min(rows, element_budget // max(1, 2 * count * rows * size)))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        picked = torch.arange(start, stop, device=device)
        slots = torch.arange(len(picked), device=device)
        coefficients = torch.zeros(count, 2 * len(picked), rows, size, dtype=dtype, device=device)
        coefficients[:, slots, picked] = direction[:, picked].to(dtype)
        coefficients[:, len(picked) + slots, picked] = -direction[:, picked].to(dtype)
        values = bound(centred, coefficients.reshape(count, 2 * len(picked), *clean.shape[1:]))
        upper[:, start:stop], lower[:, start:stop] = values[:, :len(picked)], -values[:, len(picked):]
    distance = torch.where(lower > 0, lower, torch.where(upper < 0, -upper, torch.zeros_like(lower)))
    distance = torch.nan_to_num(distance, nan=0.0, posinf=0.0)
    norm_squared = (direction * direction).sum(-1)
    floor = torch.where(norm_squared > 0, distance * distance / torch.where(norm_squared > 0, norm_squared, 1.0), 0.0)
    # Rounding: the squares, the sum of n of them and the quotient each lose a few ulps.
    floor = floor * (1.0 - 8 * (size + 4) * _EPS64) / size
    value = floor + float(rule.offset) * (1.0 - 4 * _EPS64)
    return value.reshape(count, *lead, *([1] * rule.dims))
