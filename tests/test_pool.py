"""MaxPool relaxation (verifier/bounds/pool.py): the lines contain the max on every box, and the
bound of a Conv-ReLU-MaxPool net is sound and no looser than the constant relaxation's."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from test_bounds import _attack

from verifier.bounds import pool, propagate
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.convert import convert_model
from verifier.onnx_io import load_model

N = helper.make_node
WINDOWS = 64  # images per hypothesis example, each with 1-25 windows: >= 1,280 boxes over 20 examples


def _boxes(seed: int, kernel: int, stride: int, pad: int, scale: float):
    """Random input intervals (WINDOWS images of one channel) with degenerate and wide units."""
    generator = torch.Generator().manual_seed(seed)
    size = 4
    low = torch.randn(WINDOWS, 1, size, size, generator=generator, dtype=torch.float64) * scale
    width = torch.rand(low.shape, generator=generator, dtype=torch.float64) * scale * 2
    kind = torch.rand(low.shape, generator=generator, dtype=torch.float64)
    width = torch.where(kind < 0.2, 0.0, torch.where(kind > 0.9, width * 50, width))  # points, wide
    params = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [pad] * 4}
    return params, low, low + width, generator


def _points(low: torch.Tensor, high: torch.Tensor, generator, count: int = 200) -> torch.Tensor:
    """Dense samples of the box: uniform points, half of them with coordinates pushed to the vertices."""
    u = torch.rand(count, *low.shape, generator=generator, dtype=low.dtype)
    corner = torch.rand(count, *low.shape, generator=generator, dtype=low.dtype) < 0.5
    u = torch.where(corner, u.round(), u)
    return low + u * (high - low)


def _lines(relax: pool.PoolRelaxation, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    taps = points.flatten(-2)[..., relax.taps.clamp_min(0)]  # (S, N, C, windows, taps)
    valid = relax.taps >= 0
    lower = torch.where(valid, taps * relax.lower_weight, 0.0).sum(-1)
    upper = torch.where(valid, taps * relax.upper_weight, 0.0).sum(-1) + relax.upper_offset
    return lower, upper


def _max_pool(params: dict, points: torch.Tensor) -> torch.Tensor:
    flat = points.reshape(-1, *points.shape[2:])
    out = torch.nn.functional.max_pool2d(flat, params["kernel_shape"], params["strides"], params["pads"][0])
    return out.reshape(*points.shape[:3], -1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from([1, 2, 3]), stride=st.sampled_from([1, 2]),
       pad=st.sampled_from([0, 1]), scale=st.sampled_from([1e-3, 1.0, 100.0]))
def test_relaxation_contains_the_max_on_random_boxes(seed, kernel, stride, pad, scale):
    pad = pad if pad <= kernel // 2 else 0
    params, low, high, generator = _boxes(seed, kernel, stride, pad, scale)
    relax = pool.pool_relaxation(params, "mp", low, high)
    constant = pool.constant_pool_relaxation(params, "mp", low, high)
    points = _points(low, high, generator)
    truth = _max_pool(params, points)
    for lines in (relax, constant):
        lower, upper = _lines(lines, points)
        assert torch.all(lower <= truth + 1e-12 * (1 + truth.abs()))
        assert torch.all(truth <= upper)
    # the chord lies below the constant on the whole box: compare at the box's vertices' extremes
    _, upper = _lines(relax, points)
    _, upper_constant = _lines(constant, points)
    assert torch.all(upper <= upper_constant + 1e-9 * (1 + upper_constant.abs()))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_every_member_of_the_family_is_sound(seed):
    """Any upper weights in [0, 1] with the offset of eq. P1, any convex lower weights."""
    params, low, high, generator = _boxes(seed, 2, 1, 0, 1.0)
    windows = pool.window_bounds(params, "mp", low, high)
    weight = torch.rand(windows.lows.shape, generator=generator, dtype=torch.float64)
    weight = torch.where(torch.rand(weight.shape, generator=generator, dtype=weight.dtype) < 0.3, weight.round(), weight)
    lower = torch.rand(weight.shape, generator=generator, dtype=weight.dtype)
    relax = pool.PoolRelaxation(windows.taps, lower / lower.sum(-1, keepdim=True), weight,
                                pool.upper_offset(weight, windows), low.shape)
    points = _points(low, high, generator)
    truth = _max_pool(params, points)
    below, above = _lines(relax, points)
    assert torch.all(below <= truth + 1e-12 * (1 + truth.abs())) and torch.all(truth <= above)


def test_decided_windows_are_exact_and_infinite_ends_fall_back_to_the_constant():
    params = {"kernel_shape": [2, 2], "strides": [2, 2]}
    low = torch.tensor([[[[2.0, 0.0], [0.5, -1.0]]]], dtype=torch.float64)
    high = torch.tensor([[[[3.0, 1.5], [1.0, 0.0]]]], dtype=torch.float64)
    relax = pool.pool_relaxation(params, "mp", low, high)
    assert relax.upper_weight.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    assert relax.lower_weight.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    assert abs(float(relax.upper_offset)) < 1e-12
    # undecided: chord of max(x_0, 2.5) over [2, 3] -> slope 0.5 through (2, 2.5) and (3, 3)
    undecided = high.clone()
    undecided[0, 0, 0, 1] = 2.5
    relax = pool.pool_relaxation(params, "mp", low, undecided)
    assert relax.upper_weight.flatten().tolist() == [0.5, 0.0, 0.0, 0.0]
    assert float(relax.upper_offset) == pytest.approx(1.5, abs=1e-12)
    relax = pool.pool_relaxation(params, "mp", low, high.clone().fill_(math.inf))
    assert torch.all(relax.upper_weight == 0) and float(relax.upper_offset) == math.inf


def _conv_pool_net(seed: int, pad: int = 0):
    """x(1x6x6) -> Conv 3x3 (4 channels) -> Relu -> MaxPool 2x2 (stride 1, `pad`) -> Gemm -> 3 logits."""
    rng = np.random.default_rng(seed)
    side = 3 + 2 * pad
    nodes = [N("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3]), N("Relu", ["c"], ["r"]),
             N("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[1, 1], pads=[pad] * 4),
             N("Flatten", ["mp"], ["f"]), N("Gemm", ["f", "w", "b"], ["y"], transB=1)]
    inits = [const("cw", rng.normal(size=(4, 1, 3, 3))), const("cb", rng.normal(size=4) * 0.3),
             const("w", rng.normal(size=(3, 4 * side * side)) * 0.3), const("b", rng.normal(size=3) * 0.1)]
    return make_model(nodes, [float_io("x", ["n", 1, 6, 6])], [float_io("y", ["n", 3])], inits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_relu_pool_bound_is_sound_and_no_looser_than_the_constant(tmp_path, monkeypatch, seed):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(_conv_pool_net(seed).SerializeToString())
    converted = convert_model(load_model(path))
    network = BoundNetwork.from_model(converted)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(0, 1, size=(8, 1, 6, 6)))
    y = torch.from_numpy(rng.integers(0, 3, size=8))
    radius = torch.full((8,), 0.05, dtype=torch.float64)
    bound = margin_bounds(network, x, y, radius, "inf", box=(0.0, 1.0), device="cpu").worst_margin
    found = _attack(converted.logits_module.double(), x, y, radius, "inf", (0.0, 1.0), steps=40)
    assert torch.all(found <= bound + 1e-9)
    monkeypatch.setattr(propagate, "pool_relaxation", pool.constant_pool_relaxation)
    constant = margin_bounds(network, x, y, radius, "inf", box=(0.0, 1.0), device="cpu").worst_margin
    assert torch.all(bound <= constant + 1e-9)
    assert float((constant - bound).mean()) > 1e-3  # the chord matters on this net


def test_adjoint_reads_no_padding_tap():
    """Weights left on padding taps (an optimiser may move them) must not reach any input."""
    params, low, high, generator = _boxes(3, 2, 1, 1, 1.0)
    relax = pool.pool_relaxation(params, "mp", low, high)
    valid = relax.taps >= 0
    assert not bool(valid.all())
    stray = replace(relax, upper_weight=torch.where(valid, relax.upper_weight, 0.7),
                    lower_weight=torch.where(valid, relax.lower_weight, 0.3))
    lam = torch.randn(WINDOWS, 2, 1, 5, 5, generator=generator, dtype=torch.float64)
    for a, b in zip(pool.pool_adjoint(relax, lam), pool.pool_adjoint(stray, lam)):
        assert torch.equal(a, b)


def _two_conv_pool_net(seed: int):
    """x(1x6x6) -> Conv -> Relu -> Conv -> Relu -> MaxPool 2x2 -> Gemm: stable units of the second
    conv reach the pool through their ReLU's output interval."""
    rng = np.random.default_rng(seed)
    nodes = [N("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
             N("Conv", ["r", "dw", "db"], ["d"], kernel_shape=[3, 3]), N("Relu", ["d"], ["s"]),
             N("MaxPool", ["s"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]), N("Flatten", ["mp"], ["f"]),
             N("Gemm", ["f", "w", "b"], ["y"], transB=1)]
    inits = [const("cw", rng.normal(size=(3, 1, 3, 3))), const("cb", rng.normal(size=3) * 0.3),
             const("dw", rng.normal(size=(3, 3, 3, 3)) * 0.5), const("db", rng.normal(size=3) * 0.3),
             const("w", rng.normal(size=(3, 3 * 2 * 2))), const("b", rng.normal(size=3) * 0.1)]
    return make_model(nodes, [float_io("x", ["n", 1, 6, 6])], [float_io("y", ["n", 3])], inits)


def test_stable_units_feeding_a_pool_are_still_tightened(tmp_path, monkeypatch):
    """The pool's relaxation reads the intervals of stable ReLU units too: skipping their
    back-substitution would loosen it (it did, by 1.6x on the shipped CNN at 1/255)."""
    path = tmp_path / "cnn.onnx"
    path.write_bytes(_two_conv_pool_net(1).SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(0, 1, size=(8, 1, 6, 6)))
    y = torch.from_numpy(rng.integers(0, 3, size=8))
    selected = margin_bounds(network, x, y, 0.05, "inf", box=(0.0, 1.0), device="cpu").upper
    monkeypatch.setattr(propagate, "_units_worth_tightening", lambda *args: None)
    every = margin_bounds(network, x, y, 0.05, "inf", box=(0.0, 1.0), device="cpu").upper
    assert torch.allclose(selected, every, rtol=1e-10, atol=1e-10)


def _shipped_like_cnn(seed: int):
    """x(1x8x8) -> Conv -> Relu -> MaxPool 2x2 -> Conv -> Relu -> MaxPool 2x2 -> Gemm (the shipped
    CNN's layout): the first pool's output reaches a ReLU, the second's only affine nodes."""
    rng = np.random.default_rng(seed)
    nodes = [N("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
             N("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             N("Conv", ["p", "dw", "db"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), N("Relu", ["d"], ["s"]),
             N("MaxPool", ["s"], ["q"], kernel_shape=[2, 2], strides=[2, 2]), N("Flatten", ["q"], ["f"]),
             N("Gemm", ["f", "w", "b"], ["y"], transB=1)]
    inits = [const("cw", rng.normal(size=(4, 1, 3, 3))), const("cb", rng.normal(size=4) * 0.3),
             const("dw", rng.normal(size=(6, 4, 3, 3)) * 0.4), const("db", rng.normal(size=6) * 0.3),
             const("w", rng.normal(size=(3, 6 * 2 * 2))), const("b", rng.normal(size=3) * 0.1)]
    return make_model(nodes, [float_io("x", ["n", 1, 8, 8])], [float_io("y", ["n", 3])], inits)


def test_taps_the_pool_does_not_read_need_no_tightening(tmp_path, monkeypatch):
    """`margins_only`: the losing taps of decided windows (and a decided winner whose pool feeds only
    affine nodes) keep their interval bounds; the margin and slope bounds stay the same, to rounding."""
    from verifier.bounds.margins import margins_from
    from verifier.bounds.propagate import margin_problem
    from verifier.bounds.slopes import slopes_from

    path = tmp_path / "cnn.onnx"
    path.write_bytes(_shipped_like_cnn(4).SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.uniform(0, 1, size=(6, 1, 8, 8)))
    y = torch.from_numpy(rng.integers(0, 3, size=6))
    tightened = {False: 0, True: 0}
    mode = [False]
    original = propagate._linear_interval

    def counting(net, state, region, name, needed, deadline, **options):
        tightened[mode[0]] += needed.numel() if needed is None else int(needed.sum())
        return original(net, state, region, name, needed, deadline, **options)

    monkeypatch.setattr(propagate, "_linear_interval", counting)
    for radius in (0.002, 0.02, 0.1):
        problem = margin_problem(network, x, y, radius, "inf", (0.0, 1.0), torch.device("cpu"), torch.float64)
        results = []
        for margins_only in (False, True):
            mode[0] = margins_only
            state = propagate.propagate(network, problem.region, margins_only=margins_only)
            results.append((margins_from(problem, state).upper, slopes_from(problem, state).per_class))
        (every_margin, every_slope), (lazy_margin, lazy_slope) = results
        assert torch.allclose(lazy_margin, every_margin, rtol=1e-10, atol=1e-10)
        assert torch.allclose(lazy_slope, every_slope, rtol=1e-10, atol=1e-10)
    assert tightened[True] < tightened[False]  # the rule skips units on this net
