"""The optimised relaxations' free parameters (method eqs. 3.8g, 3.8h): McCormick mixing weights and
tangent points are sound for every value, on random (degenerate and wide) intervals; the search
over them on a tiny random Transformer never loosens the bound and stays above attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bilinear import BOX, _joint_points, _pair
from test_decompose import _attacked, _export, _TinyTransformer
from test_elementary import INTERVALS, KINDS, _assert_lines_contain, _intervals

from verifier.bounds import bilinear, elementary, relaxations
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.bounds.optimise import SlopeSearch
from verifier.convert import convert_model
from verifier.onnx_io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHT = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@settings(max_examples=100, deadline=None)
@given(boxes=st.lists(BOX, min_size=12, max_size=12), weights=st.lists(WEIGHT, min_size=72, max_size=72))
def test_mixed_planes_bound_the_product_for_every_weight(boxes, weights):
    """1,200 random boxes x 3 objectives of random weights, on an 11 x 11 grid of each joint box."""
    x = _pair([b[0] for b in boxes], [b[1] for b in boxes], (1, 12))
    y = _pair([b[2] for b in boxes], [b[3] for b in boxes], (1, 12))
    mix = torch.tensor(weights, dtype=torch.float64).reshape(1, 3, 2, 12)
    planes = bilinear.relax(bilinear.product(False), x, y, weights=mix)
    assert planes.per_objective and planes.a_lo.shape == (1, 3, 12)
    steps = torch.linspace(0, 1, 11, dtype=torch.float64)
    gx = (x[0][..., None, None] + (x[1] - x[0])[..., None, None] * steps[:, None]).unsqueeze(1)
    gy = (y[0][..., None, None] + (y[1] - y[0])[..., None, None] * steps[None, :]).unsqueeze(1)
    value = gx * gy

    def plane(a, b, c):
        return a[..., None, None] * gx + b[..., None, None] * gy + c[..., None, None]

    assert torch.all(plane(planes.a_lo, planes.b_lo, planes.offset_lo) <= value)
    assert torch.all(value <= plane(planes.a_hi, planes.b_hi, planes.offset_hi))


def test_corner_weights_give_the_default_planes():
    """Weights at the corner rule's choice reproduce the default planes (up to the rounding pad)."""
    generator = torch.Generator().manual_seed(3)
    for matmul in (False, True):
        shape = (2, 1, 3, 4) if matmul else (2, 5)
        x = _pair(torch.randn(shape, generator=generator).flatten().tolist(),
                  torch.rand(shape, generator=generator).flatten().tolist(), shape)
        y = _pair(torch.randn(shape, generator=generator).flatten().tolist(),
                  torch.rand(shape, generator=generator).flatten().tolist(), shape[:-2] + shape[-1:] + shape[-2:-1]
                  if matmul else shape)
        rule = bilinear.product(matmul)
        default = bilinear.relax(rule, x, y)
        mixed = bilinear.relax(rule, x, y, weights=bilinear.default_weights(rule, x, y, 2))
        for name in ("a_lo", "b_lo", "offset_lo", "a_hi", "b_hi", "offset_hi"):
            plain, each = getattr(default, name), getattr(mixed, name)
            assert each.shape == (plain.shape[0], 2, *plain.shape[1:])
            assert torch.allclose(each, plain.unsqueeze(1).expand_as(each), rtol=0, atol=1e-12)


@pytest.mark.parametrize("matmul", [False, True])
def test_per_objective_adjoint_is_sound_on_the_joint_box(matmul):
    generator = torch.Generator().manual_seed(4 + matmul)
    shape = (1, 1, 2, 2) if matmul else (1, 2, 2)
    rule = bilinear.product(matmul)
    for _ in range(20):
        x = _pair(torch.randn(4, generator=generator).tolist(), torch.rand(4, generator=generator).tolist(), shape)
        y = _pair(torch.randn(4, generator=generator).tolist(), (2 * torch.rand(4, generator=generator)).tolist(),
                  shape)
        out = rule.forward(x[0], y[0])
        lam = torch.randn(1, 6, *out.shape[1:], generator=generator, dtype=torch.float64)
        units = bilinear.default_weights(rule, x, y, 6).shape[3:]
        weights = torch.rand(1, 6, 2, *units, generator=generator, dtype=torch.float64)
        (to_x, to_y), bias = bilinear.adjoint(rule, bilinear.relax(rule, x, y, weights=weights), lam)
        xs, ys = _joint_points(x, y, generator)
        value = torch.einsum("kz,pz->pk", lam[0].flatten(1), rule.forward(xs, ys).flatten(1))
        bound = xs.flatten(1) @ to_x[0].flatten(1).T + ys.flatten(1) @ to_y[0].flatten(1).T + bias[0]
        assert torch.all(value <= bound + 1e-12)


@pytest.mark.parametrize("kind, params", KINDS, ids=[f"{k}{p.get('exponent', '')}" for k, p in KINDS])
@settings(max_examples=130, deadline=None)
@given(pairs=INTERVALS, positions=st.lists(WEIGHT, min_size=8, max_size=8))
def test_tangent_at_any_position_contains_the_function(kind, params, pairs, positions):
    """1,040 random intervals per kind, each with a random tangent point (ends included)."""
    lower, upper = _intervals(kind, pairs)
    position = torch.tensor(positions, dtype=torch.float64)
    relax = relaxations.linear_relaxation(kind, lower, upper, params, position=position)
    _assert_lines_contain(relax, kind, params, lower, upper)


def test_default_position_gives_the_default_lines():
    lower, upper = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.5, 4.0, 9.0],
                                                                                     dtype=torch.float64)
    for kind in ("exp", "square", "rsqrt", "reciprocal", "log", "sqrt"):
        default = relaxations.linear_relaxation(kind, lower, upper)
        placed = relaxations.linear_relaxation(kind, lower, upper,
                                               position=elementary.default_position(kind, lower, upper))
        for got, want in zip((placed.lower_slope, placed.lower_offset, placed.upper_slope, placed.upper_offset),
                             (default.lower_slope, default.lower_offset, default.upper_slope, default.upper_offset)):
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("intermediate", [False, True])
def test_optimised_tiny_transformer_bound_is_sound_and_never_looser(tmp_path, intermediate):
    torch.manual_seed(9)
    module = _TinyTransformer(tokens=3, features=2, dim=8, heads=2, blocks=1, norm=True).eval()
    path = tmp_path / "tiny.onnx"
    _export(module, 6, path, dynamo=False)
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(4, 6)))
    double = module.double()
    y = double(x).argmax(1)
    radius = 0.1
    plain = margin_bounds(network, x, y, radius, "inf", device="cpu")
    search = SlopeSearch(steps=8, intermediate=intermediate)
    optimised = margin_bounds(network, x, y, radius, "inf", device="cpu", optimise=search)
    found = _attacked(double, x, y, radius)
    assert torch.all(optimised.upper <= plain.upper)
    assert torch.all(found <= optimised.worst_margin + 1e-9)
    assert float((plain.worst_margin - optimised.worst_margin).sum()) > 1e-3  # the search moved the bound
