"""Back-substitution's fast paths (written adjoints, one-pass ReLU lines, upper-first tightening)
against the generic ones, on a tiny residual conv net and on single ops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from onnx import helper

from verifier.bounds import ops, relaxations
from verifier.bounds.margins import margins_from
from verifier.bounds.network import BoundNetwork
from verifier.bounds.adjoints import relaxation_adjoint, transpose
from verifier.bounds.propagate import margin_problem, propagate
from verifier.convert import convert_model
from verifier.onnx_io import load_model

N = helper.make_node


def _residual_net(seed: int):
    """Conv(stride 2) -> Relu -> Conv -> Relu -> Conv(asymmetric pads) + shortcut Conv(1x1, stride 2)
    -> Relu -> Conv + identity -> Relu -> Flatten -> Gemm -> Relu -> Gemm: a ResNet block in small."""
    rng = np.random.default_rng(seed)
    nodes = [N("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]), N("Relu", ["c1"], ["r1"]),
             N("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]), N("Relu", ["c2"], ["r2"]),
             N("Conv", ["r2", "w3"], ["c3"], pads=[1, 0, 0, 1]),
             N("Conv", ["r1", "ws"], ["s"], strides=[1, 1]), N("Add", ["c3", "s"], ["a1"]), N("Relu", ["a1"], ["r3"]),
             N("Conv", ["r3", "w4", "b4"], ["c4"], pads=[1, 1, 1, 1]), N("Add", ["c4", "r3"], ["a2"]),
             N("Relu", ["a2"], ["r4"]), N("Flatten", ["r4"], ["f"]), N("Gemm", ["f", "g1", "gb1"], ["h"], transB=1),
             N("Relu", ["h"], ["rh"]), N("Gemm", ["rh", "g2", "gb2"], ["y"], transB=1)]
    normal = lambda *shape: rng.normal(size=shape) * 0.5  # noqa: E731
    inits = [const("w1", normal(4, 2, 3, 3)), const("b1", normal(4)), const("w2", normal(4, 4, 3, 3)),
             const("b2", normal(4)), const("w3", normal(4, 4, 2, 2)), const("ws", normal(4, 4, 1, 1)),
             const("w4", normal(4, 4, 3, 3)), const("b4", normal(4)), const("g1", normal(6, 64)),
             const("gb1", normal(6)), const("g2", normal(3, 6)), const("gb2", normal(3))]
    return make_model(nodes, [float_io("x", ["n", 2, 8, 8])], [float_io("y", ["n", 3])], inits)


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet") / "resnet.onnx"
    path.write_bytes(_residual_net(3).SerializeToString())
    converted = convert_model(load_model(path))
    return converted, BoundNetwork.from_model(converted)


def _without_adjoints(network: BoundNetwork) -> BoundNetwork:
    """The same network with every written adjoint removed (back-substitution takes vjps)."""
    plain = {"adjoint": None, "unit_adjoint": None, "unit_signs": None}
    nodes = tuple(dataclasses.replace(n, rule=dataclasses.replace(n.rule, **plain))
                  if isinstance(n.rule, ops.Affine) else n for n in network.nodes)
    return dataclasses.replace(network, nodes=nodes)


def _bounds(network, x, y, radius, margins_only):
    problem = margin_problem(network, x, y, radius, "inf", (0.0, 1.0), torch.device("cpu"), torch.float64)
    state = propagate(network, problem.region, margins_only=margins_only)
    return state, margins_from(problem, state).upper


def test_written_adjoints_equal_the_vjp(residual):
    _, network = residual
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = network.values(x)
    written = [n for n in network.nodes if isinstance(n.rule, ops.Affine) and n.rule.adjoint is not None]
    assert {n.op for n in written} >= {"Conv", "Add", "Gemm", "Reshape"}  # Flatten becomes a Reshape
    for node in written:
        shapes = [values[i].shape[1:] for i in node.inputs]
        rows = torch.randn(5, *values[node.name].shape[1:], dtype=torch.float64)
        zeros = [torch.zeros(1, *shape, dtype=torch.float64) for shape in shapes]
        for mine, reference in zip(node.rule.adjoint(rows, shapes), transpose(node.rule.linear, zeros, rows)):
            assert mine.shape == reference.shape
            assert torch.allclose(mine, reference, rtol=0, atol=1e-13), node.name


@pytest.mark.parametrize("attributes", [
    {"strides": [2, 1], "pads": [0, 1, 2, 0], "dilations": [1, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "group": 2},
    {"auto_pad": "VALID", "strides": [3, 2]},
])
def test_conv_adjoint_is_thetranspose(attributes):
    generator = torch.Generator().manual_seed(1)
    groups = attributes.get("group", 1)
    weight = torch.randn(4, 4 // groups, 3, 2, dtype=torch.float64, generator=generator)
    rule = ops.conv(attributes, weight, None)
    u = torch.randn(3, 4, 7, 9, dtype=torch.float64, generator=generator)
    out = rule.linear(u)
    rows = torch.randn(3, *out.shape[1:], dtype=torch.float64, generator=generator)
    (adjoint,) = rule.adjoint(rows, [u.shape[1:]])
    # <rows, L u> = <L^T rows, u> for every sample
    assert torch.allclose((rows * out).flatten(1).sum(1), (adjoint * u).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    # unit rows: the kernel placed at the unit's window = the transpose of the one-hot row, exactly
    index = torch.randperm(out[0].numel(), generator=generator)[:20]
    one_hot = torch.zeros(20, out[0].numel(), dtype=torch.float64).scatter_(1, index.unsqueeze(1), 1.0)
    sign = torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0).double()
    (placed,) = rule.unit_adjoint(index, sign, [u.shape[1:]])
    assert torch.equal(placed, rule.adjoint(one_hot.reshape(20, *out.shape[1:]) * sign.reshape(-1, 1, 1, 1),
                                            [u.shape[1:]])[0])
    # signs +-1 read a table of every unit's transpose; other signs place the kernel: the same values
    (doubled,) = rule.unit_adjoint(index, 2 * sign, [u.shape[1:]])
    assert torch.equal(doubled, 2 * placed)


def test_relaxation_adjoint_is_the_signed_line_choice():
    generator = torch.Generator().manual_seed(2)
    low = torch.randn(2, 5, 3, dtype=torch.float64, generator=generator)
    high = low + torch.rand(2, 5, 3, dtype=torch.float64, generator=generator) * 2
    relax = relaxations.linear_relaxation("relu", low, high)
    lam = torch.randn(2, 7, 5, 3, dtype=torch.float64, generator=generator)
    lam[:, :2] = 0.0
    positive, negative = lam.clamp_min(0), lam.clamp_max(0)
    expected = positive * relax.upper_slope.unsqueeze(1) + negative * relax.lower_slope.unsqueeze(1)
    offset = (positive * relax.upper_offset.unsqueeze(1) + negative * relax.lower_offset.unsqueeze(1)).flatten(2).sum(-1)
    contribution, bias = relaxation_adjoint(relax, lam)
    assert torch.equal(contribution, expected)
    assert torch.allclose(bias, offset, rtol=1e-14, atol=1e-14)
    # samples with different numbers of unstable units (each sample's are gathered, padded to the most)
    stable_first = torch.cat([low[:1].abs() + 0.1, low[1:]])
    uneven = relaxations.linear_relaxation("relu", stable_first, high.abs() + 0.2)
    assert not uneven.upper_offset[0].any() and uneven.upper_offset[1].any()  # sample 0 has no unstable unit
    up, down = uneven.upper_slope.unsqueeze(1), uneven.lower_slope.unsqueeze(1)
    contribution, bias = relaxation_adjoint(uneven, lam)
    assert torch.equal(contribution, lam.clamp_min(0) * up + lam.clamp_max(0) * down)
    assert torch.allclose(bias, (lam.clamp_min(0) * uneven.upper_offset.unsqueeze(1)).flatten(2).sum(-1),
                          rtol=1e-14, atol=1e-14)
    # lines per objective (the slope search's) take the general path: the same values
    lines = {field.name: getattr(relax, field.name).unsqueeze(1).expand(2, 7, 5, 3)
             for field in dataclasses.fields(relax)}
    contribution, bias = relaxation_adjoint(relaxations.Relaxation(**lines), lam)
    assert torch.equal(contribution, expected)
    assert torch.allclose(bias, offset, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("radius", [0.02, 0.08])
@pytest.mark.parametrize("seed", [4, 5])
def test_fast_paths_equal_the_generic_bounds_and_contain_samples(residual, radius, seed):
    _compare_fast_and_generic(residual[1], radius, seed)


def test_upper_first_skips_lower_bounds_of_dead_units(residual):
    assert sum(_compare_fast_and_generic(residual[1], 0.05, seed) for seed in (4, 5)) > 0


def _compare_fast_and_generic(network: BoundNetwork, radius: float, seed: int) -> int:
    """Assert the fast and generic paths agree and contain samples; return how many lower bounds the
    fast path skipped. One sample: with several, each sample's unit list is padded to the longest
    with other units, whose (sound) bounds then depend on how many units each pass took."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64, generator=generator)
    y = network.evaluate(x).argmax(1)
    fast_state, fast = _bounds(network, x, y, radius, margins_only=True)  # upper-first tightening
    generic_state, generic = _bounds(_without_adjoints(network), x, y, radius, margins_only=False)
    assert torch.allclose(fast, generic, rtol=1e-12, atol=1e-12)
    # upper bounds agree everywhere, lower bounds on every live unit; some dead unit kept its looser
    # interval lower bound (its lower back-substitution was skipped)
    skipped = 0
    for name in _relu_inputs(network):
        (fast_low, fast_high), (generic_low, generic_high) = fast_state.intervals[name], generic_state.intervals[name]
        assert torch.allclose(fast_high, generic_high, rtol=1e-12, atol=1e-12)
        live = generic_high > 0
        assert torch.allclose(fast_low[live], generic_low[live], rtol=1e-12, atol=1e-12)
        skipped += int((fast_low < generic_low - 1e-9).sum())
    # soundness: sampled points of the ball's margins stay under both bounds, every live unit's
    # sampled pre-activation inside both intervals
    points = (x.unsqueeze(0) + (torch.rand(200, *x.shape, dtype=torch.float64, generator=generator) * 2 - 1)
              * radius).clamp(0, 1).reshape(-1, *x.shape[1:])
    values = network.values(points)
    logits = values[network.output].reshape(200, 1, -1)
    margins = logits - logits.gather(2, y.reshape(1, 1, 1).expand(200, 1, 1))
    assert torch.all(margins <= fast.unsqueeze(0) + 1e-9)
    for node in network.nodes:
        for state in (fast_state, generic_state):
            low, high = state.intervals[node.name]
            value = values[node.name].reshape(200, *low.shape)
            assert torch.all(value <= high + 1e-9), node.name
            live = high > 0 if node.name in _relu_inputs(network) else torch.ones_like(high, dtype=torch.bool)
            assert torch.all((value >= low - 1e-9) | ~live), node.name
    return skipped


def _relu_inputs(network: BoundNetwork) -> set[str]:
    return {n.inputs[0] for n in network.nodes if getattr(n.rule, "kind", None) == "relu"}
