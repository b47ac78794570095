"""MaxPool relaxation: linear lower and upper bounds of each window's max over the box of its
inputs, and their adjoint for back-substitution (method.md §7, "MaxPool").

A window `y = max_t x_t` with `x_t in [l_t, u_t]` is bounded by
- below, any convex combination `y >= sum_t b_t x_t` (`b >= 0`, `sum b = 1`);
- above, for any weights `a in [0, 1]^T` (method.md eq. P1),
  `y <= sum_t a_t (x_t - l_t) + max_k (u_k - a_k (u_k - l_k))`.
The default picks `b` one-hot at the largest centre `(l_t + u_t) / 2` and `a` one-hot at the largest upper
bound `w`, with `a_w = (u_w - u_m) / (u_w - l_w)` clipped to [0, 1] (`u_m` the largest other
upper bound): the chord of `max(x_w, u_m)` over `[l_w, u_w]`, which lies below the constant
`u_w` everywhere on the box and is exact (`y = x_w`) when the window is decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from verifier.cells import window_index


@dataclass(frozen=True)
class PoolRelaxation:
    """`sum_t lower_weight_t x_t <= y <= sum_t upper_weight_t x_t + upper_offset` per window.

    Weights are (N, C, windows, taps), or (N, K, C, windows, taps) with one set per objective
    (then `upper_offset` is (N, K, C, windows)); taps index the flat input positions `taps`.
    """

    taps: torch.Tensor  # (windows, taps): flat input position of each tap, -1 for padding
    lower_weight: torch.Tensor
    upper_weight: torch.Tensor
    upper_offset: torch.Tensor
    input_shape: torch.Size  # (N, C, H, W)
    # Where both weights are one-hot per window (the default relaxations): the tap of each (N, C, windows)
    # holding the upper weight and the lower one, so the adjoint moves one number a window, not T.
    upper_tap: torch.Tensor | None = None
    lower_tap: torch.Tensor | None = None


@dataclass(frozen=True)
class WindowBounds:
    """Interval bounds of every tap (N, C, windows, taps); padding taps are -inf at both ends."""

    lows: torch.Tensor
    highs: torch.Tensor
    valid: torch.Tensor  # (windows, taps) bool
    taps: torch.Tensor


def window_bounds(params: dict, node: str, low: torch.Tensor, high: torch.Tensor) -> WindowBounds:
    """Gather the input intervals (N, C, H, W) of a 2-D MaxPool by window and tap."""
    count, channels, height, width = low.shape
    taps = window_index(params, node, height, width, low.device)  # (windows, taps)
    valid, safe = taps >= 0, taps.clamp_min(0)
    lows = low.reshape(count, channels, -1)[:, :, safe].masked_fill(~valid, -math.inf)
    highs = high.reshape(count, channels, -1)[:, :, safe].masked_fill(~valid, -math.inf)
    return WindowBounds(lows, highs, valid, taps)


def upper_offset(weight: torch.Tensor, windows: WindowBounds) -> torch.Tensor:
    """The offset of eq. P1 for weights `a in [0, 1]` (broadcast against the window bounds), rounded up.

    Windows with an infinite bound fall back to the constant `max u` (weights must be 0 there).
    """
    lows, highs = _per_objective(windows.lows, weight), _per_objective(windows.highs, weight)
    finite = torch.isfinite(lows) | ~windows.valid
    finite = finite & (torch.isfinite(highs) | ~windows.valid)
    usable = finite & windows.valid
    low0, high0 = torch.where(usable, lows, 0.0), torch.where(usable, highs, 0.0)
    weight = torch.where(windows.valid, weight, 0.0)
    peaks = torch.where(windows.valid, high0 - weight * (high0 - low0), -math.inf).amax(-1)
    offset = peaks - (weight * low0).sum(-1)
    # Rounding: a few operations per tap, each within eps of a magnitude <= |u_t| + |l_t|.
    scale = (high0.abs() + low0.abs()).sum(-1)
    offset = offset + (4 * weight.shape[-1] + 8) * torch.finfo(offset.dtype).eps * (1.0 + scale)
    return torch.where(finite.all(-1), offset, highs.amax(-1))


def pool_relaxation(params: dict, node: str, low: torch.Tensor, high: torch.Tensor) -> PoolRelaxation:
    """The default relaxation of a MaxPool on the interval [low, high] of its input (module docstring)."""
    windows = window_bounds(params, node, low, high)
    lows, highs = windows.lows, windows.highs
    # The lower line is the tap with the largest centre: the decided winner where there is one, and on
    # ties tighter than the largest lower bound (docs/benchmarks.md, CNN). Centres are compared in
    # float32 so that rounding noise in the intervals does not flip the choice between tied taps.
    centre = torch.where(windows.valid, 0.5 * lows + 0.5 * highs, -math.inf)
    centre = torch.nan_to_num(centre, nan=-math.inf).to(torch.float32)
    lower_tap = centre.argmax(-1, keepdim=True)
    lower_weight = torch.zeros_like(lows).scatter(-1, lower_tap, 1.0)
    top = highs.argmax(-1, keepdim=True)
    top_low, top_high = lows.gather(-1, top), highs.gather(-1, top)
    runner_up = highs.scatter(-1, top, -math.inf).amax(-1, keepdim=True)
    span = top_high - top_low
    chord = ((top_high - runner_up) / torch.where(span > 0, span, 1.0)).clamp(0.0, 1.0)
    slope = torch.where(span > 0, chord, 1.0)
    finite = (torch.isfinite(lows) & torch.isfinite(highs) | ~windows.valid).all(-1, keepdim=True)
    slope = torch.where(finite, torch.nan_to_num(slope, nan=0.0), 0.0)
    upper_weight = torch.zeros_like(highs).scatter(-1, top, slope)
    return PoolRelaxation(windows.taps, lower_weight, upper_weight, upper_offset(upper_weight, windows), low.shape,
                          top.squeeze(-1), lower_tap.squeeze(-1))


def pool_adjoint(relax: PoolRelaxation, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-substitute `lam` (N, K, C, H', W') through the relaxation: the input coefficients and
    the offset `<lam+, upper_offset>` (N, K)."""
    count, objectives = lam.shape[:2]
    _, channels, height, width = relax.input_shape
    flat = lam.reshape(count, objectives, channels, -1)  # (N, K, C, windows)
    positive = flat.clamp_min(0)
    contribution = torch.zeros(count, objectives, channels, height * width, dtype=lam.dtype, device=lam.device)
    if relax.upper_tap is not None and relax.lower_tap is not None and relax.upper_weight.dim() == flat.dim():
        # One-hot weights: lam > 0 goes to the upper tap times its weight, lam < 0 to the lower tap
        # (weight 1); the same sums as the general form below, whose other terms are all zeros.
        rising = flat > 0
        slope = relax.upper_weight.gather(-1, relax.upper_tap.unsqueeze(-1)).squeeze(-1).unsqueeze(1)
        windows = torch.arange(relax.taps.shape[0], device=lam.device)
        # the input position each window's coefficient reaches when positive / otherwise (N, C, windows)
        rises_to, falls_to = relax.taps[windows, relax.upper_tap], relax.taps[windows, relax.lower_tap]
        position = torch.where(rising, rises_to.unsqueeze(1), falls_to.unsqueeze(1))  # (N, K, C, windows)
        value = torch.where(rising, flat * slope, flat)
        if bool((rises_to < 0).any() or (falls_to < 0).any()):
            value = torch.where(position >= 0, value, 0.0)  # padding taps read no input
            position = position.clamp_min(0)
        contribution = contribution.scatter_add(-1, position, value)
    else:
        negative = flat.clamp_max(0)
        upper, lower = _broadcast(relax.upper_weight, flat), _broadcast(relax.lower_weight, flat)
        per_tap = positive.unsqueeze(-1) * upper + negative.unsqueeze(-1) * lower  # (N, K, C, windows, taps)
        per_tap = torch.where(relax.taps >= 0, per_tap, 0.0)  # padding taps read no input
        index = relax.taps.clamp_min(0).reshape(1, 1, 1, -1).expand(count, objectives, channels, -1)
        contribution = contribution.scatter_add(-1, index, per_tap.reshape(count, objectives, channels, -1))
    ceiling = relax.upper_offset if relax.upper_offset.dim() == flat.dim() else relax.upper_offset.unsqueeze(1)
    product = positive * ceiling
    if not bool(torch.isfinite(relax.upper_offset).all()):
        # 0 * inf counts as 0: a window with an unbounded input costs nothing when lam+ is 0 there.
        product = torch.where(positive == 0, 0.0, product)
    offset = product.flatten(2).sum(-1)
    return contribution.reshape(count, objectives, channels, height, width), offset


def _broadcast(weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Weights shared by the objectives (N, C, W, T) get an objective axis; per-objective ones pass."""
    return weight if weight.dim() == flat.dim() + 1 else weight.unsqueeze(1)


def _per_objective(bounds: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Window bounds (N, C, W, T) lined up with weights that may carry an objective axis."""
    return bounds.unsqueeze(1) if weight.dim() == bounds.dim() + 1 else bounds


def constant_pool_relaxation(params: dict, node: str, low: torch.Tensor, high: torch.Tensor) -> PoolRelaxation:
    """The relaxation before eq. P1 (kept as the reference the tests and benchmarks compare with):
    `y <= x_w` where the winner `w` is decided (its lower bound beats every other upper bound), else
    `y <= max u`, a constant."""
    windows = window_bounds(params, node, low, high)
    winner = windows.lows.argmax(-1, keepdim=True)
    others = windows.highs.scatter(-1, winner, -math.inf).amax(-1, keepdim=True)
    decided = windows.lows.gather(-1, winner) >= others
    one_hot = torch.zeros_like(windows.lows).scatter(-1, winner, 1.0)
    upper_weight = torch.where(decided, one_hot, 0.0)
    return PoolRelaxation(windows.taps, one_hot, upper_weight, upper_offset(upper_weight, windows), low.shape)


def taps_read(params: dict, node: str, low: torch.Tensor, high: torch.Tensor, output_read: bool) -> torch.Tensor:
    """Mask (N, C, H, W) of the MaxPool inputs, with intervals [low, high] (all >= 0, a ReLU's), whose
    interval the default relaxation, its adjoint and the slope bounds can read.

    A window is decided when its winner's lower bound is positive and beats every other tap's upper
    bound by a margin that rounding cannot close: then `y = x_w` below and above (offset 0) on every
    sub-interval, the adjoint and the Clarke Jacobian reach the winner only, and the output interval is
    the winner's. Its other taps are not read at all; the winner only when `output_read` (the output
    interval is used later). Inputs in no window are not read either.
    """
    count, channels = low.shape[:2]
    windows = window_bounds(params, node, low, high)
    lows, highs = windows.lows, windows.highs
    winner = lows.argmax(-1, keepdim=True)
    winning_low = lows.gather(-1, winner)
    rival = highs.scatter(-1, winner, -math.inf).amax(-1, keepdim=True)
    decided = (winning_low > 0) & (winning_low - rival > 1e-6 * (1.0 + winning_low.abs()))
    is_winner = torch.zeros_like(lows, dtype=torch.bool).scatter(-1, winner, True)
    read = windows.valid & (~decided | (is_winner & output_read))  # (N, C, windows, taps)
    index = windows.taps.clamp_min(0).reshape(1, 1, -1).expand(count, channels, -1)
    hits = torch.zeros(count, channels, low[0, 0].numel(), dtype=low.dtype, device=low.device)
    hits.scatter_add_(-1, index, read.reshape(count, channels, -1).to(low.dtype))
    return (hits > 0).reshape(low.shape)
