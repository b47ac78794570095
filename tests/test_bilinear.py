"""McCormick planes of x*y and x@y: they bound the product on a dense grid of the joint box, and the
adjoint turns them into a sound upper bound of any linear objective of the product."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.bounds import bilinear

ENDS = st.floats(-5.0, 5.0)
WIDTH = st.one_of(st.just(0.0), st.floats(0.0, 1e-9), st.floats(0.0, 3.0))
BOX = st.tuples(ENDS, WIDTH, ENDS, WIDTH)


def _pair(values: list[float], widths: list[float], shape: tuple[int, ...]):
    low = torch.tensor(values, dtype=torch.float64).reshape(shape)
    return low, low + torch.tensor(widths, dtype=torch.float64).reshape(shape)


@settings(max_examples=100, deadline=None)
@given(boxes=st.lists(BOX, min_size=12, max_size=12))
def test_planes_bound_the_product_on_a_dense_grid(boxes):
    """1,200 random boxes (degenerate and wide), an 11 x 11 grid of each joint box."""
    x = _pair([b[0] for b in boxes], [b[1] for b in boxes], (1, 12))
    y = _pair([b[2] for b in boxes], [b[3] for b in boxes], (1, 12))
    planes = bilinear.relax(bilinear.product(False), x, y)
    steps = torch.linspace(0, 1, 11, dtype=torch.float64)
    gx = x[0][..., None, None] + (x[1] - x[0])[..., None, None] * steps[:, None]
    gy = y[0][..., None, None] + (y[1] - y[0])[..., None, None] * steps[None, :]
    value = gx * gy

    def plane(a, b, c):
        return a[..., None, None] * gx + b[..., None, None] * gy + c[..., None, None]

    assert torch.all(plane(planes.a_lo, planes.b_lo, planes.offset_lo) <= value)
    assert torch.all(value <= plane(planes.a_hi, planes.b_hi, planes.offset_hi))
    # a plane is exact on two edges of the box: its gap is 0 at three of the four corners
    corners = value[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    gaps = corners - plane(planes.a_lo, planes.b_lo, planes.offset_lo)[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.all((gaps.abs() < 1e-9 * (1 + corners.abs())).sum(-1) >= 3)


def _joint_points(x, y, generator, count: int = 300):
    """Every vertex of the joint box (x and y of 4 entries each: 256) and random interior points."""
    lows, highs = torch.cat([x[0].flatten(), y[0].flatten()]), torch.cat([x[1].flatten(), y[1].flatten()])
    vertices = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(lows))), dtype=torch.float64)
    mix = torch.cat([vertices, torch.rand(count, len(lows), generator=generator, dtype=torch.float64)])
    points = lows + (highs - lows) * mix
    split = x[0].numel()
    return points[:, :split].reshape(-1, *x[0].shape[1:]), points[:, split:].reshape(-1, *y[0].shape[1:])


def _check_adjoint(rule, x, y, generator):
    planes = bilinear.relax(rule, x, y)
    out = rule.forward(x[0], y[0])
    lam = torch.randn(1, 6, *out.shape[1:], generator=generator, dtype=torch.float64)
    (to_x, to_y), bias = bilinear.adjoint(rule, planes, lam)
    xs, ys = _joint_points(x, y, generator)
    value = torch.einsum("kz,pz->pk", lam[0].flatten(1), rule.forward(xs, ys).flatten(1))
    bound = xs.flatten(1) @ to_x[0].flatten(1).T + ys.flatten(1) @ to_y[0].flatten(1).T + bias[0]
    assert torch.all(value <= bound + 1e-12)
    low, high = rule.rule([x, y])
    products = rule.forward(xs, ys)
    assert torch.all((low <= products) & (products <= high))


def test_elementwise_adjoint_with_broadcasting_is_sound_on_the_joint_box():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = _pair(torch.randn(4, generator=generator).tolist(), torch.rand(4, generator=generator).tolist(),
                  (1, 2, 2))
        y = _pair(torch.randn(2, generator=generator).tolist(), torch.rand(2, generator=generator).tolist(),
                  (1, 2, 1))
        _check_adjoint(bilinear.product(False), x, y, generator)


def test_matmul_adjoint_is_sound_on_the_joint_box():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = _pair(torch.randn(4, generator=generator).tolist(), torch.rand(4, generator=generator).tolist(),
                  (1, 1, 2, 2))
        y = _pair(torch.randn(4, generator=generator).tolist(), (2 * torch.rand(4, generator=generator)).tolist(),
                  (1, 1, 2, 2))
        _check_adjoint(bilinear.product(True), x, y, generator)


def test_exact_factor_gives_an_exact_product():
    """With x a point the planes are the line x0 * y itself: the bound equals the true maximum."""
    x = (torch.tensor([[2.0, -3.0]], dtype=torch.float64),) * 2
    y = (torch.tensor([[-1.0, 0.5]], dtype=torch.float64), torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    rule = bilinear.product(False)
    lam = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    (to_x, to_y), bias = bilinear.adjoint(rule, bilinear.relax(rule, x, y), lam)
    best = (to_x * x[0]).sum() + bias.sum() + torch.where(to_y > 0, to_y * y[1], to_y * y[0]).sum()
    assert float(best) == pytest.approx(2.0 * 1.0 + (-3.0) * 0.5, abs=1e-12)
