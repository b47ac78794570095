"""Products of two variable tensors: McCormick planes and their adjoint (method.md §3.8).

`Product` is the rule of `x * y` (elementwise, broadcasting) and of `x @ y` (MatMul, a sum over
the shared axis of such products). For one product `z = x y` on the box [lx, ux] x [ly, uy]:

    lower:  z >= ly x + lx y - lx ly   (exact on x = lx and on y = ly)   or
            z >= uy x + ux y - ux uy   (exact on x = ux and on y = uy)
    upper:  z <= uy x + lx y - lx uy   (exact on x = lx and on y = uy)   or
            z <= ly x + ux y - ux ly   (exact on x = ux and on y = ly)

Both planes of a side have the same mean gap over the box; per unit we take the one whose worst
corner (where its gap `wx wy` sits) has the more favourable product: the lower plane misses at
the corner with the larger product, the upper plane at the corner with the smaller one, so
neither plane's concretisation over the box exceeds the interval of `z` by more than needed.
A product with a `hull` (LayerNorm's `c · rsqrt(v)`) takes flat lines at its interval instead where
the planes' worst gap `wx wy` exceeds that interval's width. The planes hold exactly in the reals;
their offsets are widened by their rounding error, and a product with an infinite end gets flat
planes at its interval ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.bounds import ops
from verifier.bounds.adjoints import inner, per_objective

Pair = tuple[Tensor, Tensor]
_EPS64 = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Product(ops.Interval):
    """`x * y` (`matmul=False`) or `x @ y` of two variable inputs; `hull`: an optional extra interval
    rule on the input intervals, intersected with the product's (LayerNorm's direct bounds).

    `sphere_dims` > 0 (LayerNorm's `c · rsqrt(mean c² + eps)`): over each group of the last
    `sphere_dims` axes the true outputs sum to 0 and have Euclidean norm below `sqrt(n)` (n units),
    which bounds the units on flat lines jointly (method eq. 3.8i)."""

    matmul: bool = False
    hull: Callable[[Sequence[Pair]], Pair] | None = None
    sphere_dims: int = 0


def product(matmul: bool, hull: Callable[[Sequence[Pair]], Pair] | None = None, sphere_dims: int = 0) -> Product:
    """The rule of an elementwise or a matrix product of two variables."""
    base = ops.matrix_product() if matmul else ops.product()

    def rule(bounds: Sequence[Pair]) -> Pair:
        low, high = base.rule(bounds)
        if hull is None:
            return low, high
        hull_low, hull_high = hull(bounds)
        return torch.fmax(low, hull_low), torch.fmin(high, hull_high)

    return Product(rule=rule, forward=base.forward, matmul=matmul, hull=hull, sphere_dims=sphere_dims)


@dataclass(frozen=True)
class Planes:
    """`a_lo x + b_lo y + c_lo <= x y <= a_hi x + b_hi y + c_hi` per product unit.

    Elementwise: every tensor has the output's shape (N, *out). MatMul (x: (N, *b, M, K), y: (N, *b,
    K, P)): slopes and offsets are (N, *b, M, K, P); `offset_*` are already summed over K.
    """

    a_lo: Tensor
    b_lo: Tensor
    offset_lo: Tensor
    a_hi: Tensor
    b_hi: Tensor
    offset_hi: Tensor
    x_shape: torch.Size  # per-sample shapes of the two inputs (for broadcasting back)
    y_shape: torch.Size
    per_objective: bool = False  # slopes and offsets carry an objective axis K at 1 (optimised weights)
    flat: Tensor | None = None  # (N, [1,] *out): units on flat lines that the sphere bounds jointly (eq. 3.8i)


def relax(rule: Product, x: Pair, y: Pair, own: Pair | None = None, weights: Tensor | None = None) -> Planes:
    """McCormick planes of every product of `rule` on the input intervals x, y (each (N, *shape));
    `own`: the product's own (sound, rounded) interval, used where a `hull` makes it tighter.

    `weights` (N, K, 2, *units) in [0, 1], units the output's shape (MatMul: (*b, M, K, P)): per
    objective, the weight of the first plane of each side in a convex combination of its two planes
    (method eq. 3.8g); the planes then carry the objective axis. None: the corner rule's choice.
    """
    x_shape, y_shape = x[0].shape[1:], y[0].shape[1:]
    if rule.matmul:
        batch = torch.broadcast_shapes(x[0].shape[:-2], y[0].shape[:-2])
        x = tuple(v.expand(*batch, *v.shape[-2:]).unsqueeze(-1) for v in x)  # (N, *b, M, K, 1)
        y = tuple(v.expand(*batch, *v.shape[-2:]).unsqueeze(-3) for v in y)  # (N, *b, 1, K, P)
    (lx, ux), (ly, uy) = x, y
    lx, ux, ly, uy = torch.broadcast_tensors(lx, ux, ly, uy)
    finite = torch.isfinite(lx) & torch.isfinite(ux) & torch.isfinite(ly) & torch.isfinite(uy)
    lx, ux, ly, uy = (torch.where(finite, v, 0.0) for v in (lx, ux, ly, uy))
    reach_x, reach_y = torch.maximum(lx.abs(), ux.abs()), torch.maximum(ly.abs(), uy.abs())
    if weights is None:
        first_lo = ux * uy >= lx * ly  # the plane exact on x = lx, y = ly misses at (ux, uy)
        first_hi = ux * ly <= lx * uy  # the plane exact on x = lx, y = uy misses at (ux, ly)
        a_lo, b_lo = torch.where(first_lo, ly, uy), torch.where(first_lo, lx, ux)
        a_hi, b_hi = torch.where(first_hi, uy, ly), torch.where(first_hi, lx, ux)
        c_lo, c_hi = -a_lo * b_lo, -a_hi * b_hi  # -lx ly | -ux uy and -lx uy | -ux ly
        # Outward by the float64 error of evaluating a plane `a x + b y + c` on the box (a few ulps of
        # its terms' magnitudes), so that even the plane computed in floats stays on its side.
        pad_lo = 4 * _EPS64 * (a_lo.abs() * reach_x + b_lo.abs() * reach_y + c_lo.abs())
        pad_hi = 4 * _EPS64 * (a_hi.abs() * reach_x + b_hi.abs() * reach_y + c_hi.abs())
    else:
        lx, ux, ly, uy, reach_x, reach_y, finite = (v.unsqueeze(1) for v in (lx, ux, ly, uy, reach_x, reach_y, finite))
        w_lo, w_hi = weights[:, :, 0].clamp(0.0, 1.0), weights[:, :, 1].clamp(0.0, 1.0)
        a_lo, b_lo = w_lo * ly + (1 - w_lo) * uy, w_lo * lx + (1 - w_lo) * ux
        a_hi, b_hi = w_hi * uy + (1 - w_hi) * ly, w_hi * lx + (1 - w_hi) * ux
        c_lo, c_hi = -(w_lo * (lx * ly) + (1 - w_lo) * (ux * uy)), -(w_hi * (lx * uy) + (1 - w_hi) * (ux * ly))
        # Every coefficient is a convex combination of terms of magnitude <= reach_y, reach_x and
        # reach_x·reach_y: computing them and the plane costs a few ulps of 3·reach_x·reach_y.
        pad_lo = pad_hi = 16 * _EPS64 * reach_x * reach_y
    c_lo, c_hi = c_lo - pad_lo, c_hi + pad_hi
    # An infinite end: flat planes at the interval of the product (0 * inf counted as unbounded).
    corners = torch.stack([x[0] * y[0], x[0] * y[1], x[1] * y[0], x[1] * y[1]])
    if weights is not None:
        corners = corners.unsqueeze(2)
    flat_lo = torch.nan_to_num(corners, nan=-math.inf).amin(0).expand_as(c_lo)
    flat_hi = torch.nan_to_num(corners, nan=math.inf).amax(0).expand_as(c_hi)
    a_lo, b_lo, a_hi, b_hi = (torch.where(finite, v, 0.0) for v in (a_lo, b_lo, a_hi, b_hi))
    c_lo, c_hi = torch.where(finite, c_lo, flat_lo), torch.where(finite, c_hi, flat_hi)
    on_sphere = None
    if rule.hull is not None and own is not None:
        # Where the planes' worst gap (wx·wy, at the missed corner) exceeds the width of the direct
        # interval (LayerNorm's rule: a huge rsqrt upper end when the variance may be ~0), flat
        # lines at that interval are the tighter choice.
        low, high = (v.unsqueeze(1) if weights is not None else v for v in own)
        flat = (ux - lx) * (uy - ly) > high - low
        low, high = low.expand_as(c_lo), high.expand_as(c_hi)
        a_lo, b_lo, a_hi, b_hi = (torch.where(flat, 0.0, v) for v in (a_lo, b_lo, a_hi, b_hi))
        c_lo, c_hi = torch.where(flat, low, c_lo), torch.where(flat, high, c_hi)
        if rule.sphere_dims and not rule.matmul:
            on_sphere = flat | ~finite
    if rule.matmul:
        c_lo, c_hi = c_lo.sum(-2), c_hi.sum(-2)
    return Planes(a_lo, b_lo, c_lo, a_hi, b_hi, c_hi, x_shape, y_shape, weights is not None, on_sphere)


def default_weights(rule: Product, x: Pair, y: Pair, objectives: int) -> Tensor:
    """The corner rule's choice as weights (N, objectives, 2, *units) for `relax` (1: the first plane)."""
    if rule.matmul:
        batch = torch.broadcast_shapes(x[0].shape[:-2], y[0].shape[:-2])
        x = tuple(v.expand(*batch, *v.shape[-2:]).unsqueeze(-1) for v in x)
        y = tuple(v.expand(*batch, *v.shape[-2:]).unsqueeze(-3) for v in y)
    lx, ux, ly, uy = torch.broadcast_tensors(x[0], x[1], y[0], y[1])
    first = torch.stack([ux * uy >= lx * ly, ux * ly <= lx * uy], 1).to(lx.dtype)
    return first.unsqueeze(1).expand(-1, objectives, *first.shape[1:]).clone()


def adjoint(rule: Product, planes: Planes, lam: Tensor) -> tuple[list[Tensor], Tensor]:
    """Coefficients on x and y, and the bias `(N, K)`, of an upper bound of `<lam, z>` (lam: (N, K, *out))."""
    positive, negative = lam.clamp_min(0), lam.clamp_max(0)
    count, objectives = lam.shape[:2]
    if planes.per_objective and planes.a_hi.shape[1] == 1 < objectives:  # one set shared by the objectives
        planes = Planes(*(v.squeeze(1) for v in (planes.a_lo, planes.b_lo, planes.offset_lo, planes.a_hi,
                                                   planes.b_hi, planes.offset_hi)), planes.x_shape, planes.y_shape,
                        flat=None if planes.flat is None else planes.flat.squeeze(1))
    if rule.matmul:
        own = "nq" if planes.per_objective else "n"

        def through(slope_hi: Tensor, slope_lo: Tensor, out: str) -> Tensor:
            pattern = f"nq...mp,{own}...mkp->nq...{out}"
            return torch.einsum(pattern, positive, slope_hi) + torch.einsum(pattern, negative, slope_lo)
        to_x = through(planes.a_hi, planes.a_lo, "mk")
        to_y = through(planes.b_hi, planes.b_lo, "kp")
    else:
        lines = (planes.a_hi, planes.a_lo, planes.b_hi, planes.b_lo)
        upper_a, lower_a, upper_b, lower_b = lines if planes.per_objective else (v.unsqueeze(1) for v in lines)
        to_x = positive * upper_a + negative * lower_a
        to_y = positive * upper_b + negative * lower_b
    to_x = to_x.sum_to_size(count, objectives, *planes.x_shape)
    to_y = to_y.sum_to_size(count, objectives, *planes.y_shape)
    offset_hi, offset_lo = per_objective(planes.offset_hi, positive), per_objective(planes.offset_lo, negative)
    if planes.flat is None or not bool(planes.flat.any()):
        return [to_x, to_y], inner(positive, offset_hi) + inner(negative, offset_lo)
    flat = per_objective(planes.flat, lam)
    bias = inner(positive, torch.where(flat, 0.0, offset_hi)) + inner(negative, torch.where(flat, 0.0, offset_lo))
    return [to_x, to_y], bias + sphere_bound(lam, flat, offset_hi, offset_lo, rule.sphere_dims)


def sphere_bound(lam: Tensor, flat: Tensor, high: Tensor, low: Tensor, dims: int) -> Tensor:
    """Upper bound (N, K) of `Σ_{k flat} lam_k z_k`, per group of the last `dims` axes the smaller of the
    units' own intervals and the sphere (method eq. 3.8i): `z` sums to 0 with `||z||_2 < sqrt(n)`, so
    `<a, z> <= sqrt(n) ||a - mean(a)||_2` for `a` = lam on the flat units, 0 elsewhere."""
    axes = tuple(range(-dims, 0))
    units = math.prod(lam.shape[-dims:])
    own = (torch.where(flat & (lam > 0), lam * high, 0.0) + torch.where(flat & (lam < 0), lam * low, 0.0)).sum(axes)
    picked = torch.where(flat, lam, 0.0)
    # ||a - mean(a)||_2 in two passes (Σa² − (Σa)²/n cancels when a is nearly constant); clamped: no
    # NaN gradient at 0
    deviation = picked - picked.sum(axes, keepdim=True) / units
    centred = (deviation * deviation).sum(axes).clamp_min(1e-300).sqrt()
    magnitude = (picked * picked).sum(axes).clamp_min(1e-300).sqrt()
    # outward for float64 rounding: of this norm (relative ~n·eps) and of `Σ z_k = 0` (~n·eps·||z||)
    sphere = math.sqrt(units) * (centred * (1 + 1e-9) + 1e-9 * magnitude)
    return torch.minimum(own, sphere).reshape(*lam.shape[:2], -1).sum(-1)
