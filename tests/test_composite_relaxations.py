"""LayerNorm and Softmax as the bounds decompose them (centre, square, mean, rsqrt, product; differences,
exp, sum, reciprocal, product), on 1,000 random input boxes each drawn by hypothesis — degenerate
(radius 0 or below 1e-9), small and wide: every node's interval and the output's linear bounds on
random objectives contain the values at every vertex and 200 random points of each box, and the
output interval is inside the direct rule's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from test_decompose import _box_points

from verifier.bounds import ops
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, propagate, upper_bound
from verifier.cells import displacement_box
from verifier.convert import convert_model
from verifier.onnx_io import load_model

N = helper.make_node
pytestmark = pytest.mark.usefixtures("one_thread")
BOXES_PER_EXAMPLE, EXAMPLES = 10, 100  # 1,000 boxes per relaxation
RADIUS = st.one_of(st.just(0.0), st.floats(0.0, 1e-9), st.floats(1e-6, 0.05), st.floats(0.05, 3.0))
CENTRE = st.floats(-4.0, 4.0)
SCALE, BIAS = np.array([1.5, -0.7, 0.3, 2.0], np.float32), np.array([0.1, 0.0, -0.4, 0.2], np.float32)


def _built(tmp_path_factory, name: str, nodes, shape, inits) -> BoundNetwork:
    model = make_model(nodes, [float_io("x", ["n", *shape])], [float_io("y", ["n", *shape])], inits)
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return BoundNetwork.from_model(convert_model(load_model(path)))


@pytest.fixture(scope="module")
def layer_norm(tmp_path_factory) -> BoundNetwork:
    nodes = [N("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-5)]
    return _built(tmp_path_factory, "layer_norm", nodes, [4], [const("s", SCALE), const("b", BIAS)])


@pytest.fixture(scope="module")
def softmax(tmp_path_factory) -> BoundNetwork:
    nodes = [N("Softmax", ["x"], ["p"], axis=-1), N("Mul", ["p", "k"], ["y"])]  # a last Softmax is a head
    return _built(tmp_path_factory, "softmax", nodes, [2, 3], [const("k", np.float32(-2.0))])


def _contains(network: BoundNetwork, center: torch.Tensor, radius: torch.Tensor, seed: int):
    """Intervals and random-objective linear bounds hold at the vertices and 200 points of every box;
    returns every node's interval."""
    generator = torch.Generator().manual_seed(seed)
    lower, upper = displacement_box(center, None)
    region = InputSet(center=center, radius=radius, norm="inf", lower=lower, upper=upper)
    state = propagate(network, region)
    out = network.evaluate(center)
    rows = torch.randn(len(center), 5, *out.shape[1:], generator=generator, dtype=center.dtype)
    bound = upper_bound(network, state, region, network.output, rows)
    moves = _box_points(torch.zeros_like(center[:1]), 1.0, generator, count=200)  # (S, 1, *shape) in [-1, 1]
    points = center.unsqueeze(0) + moves * radius.reshape(1, -1, *[1] * (center.dim() - 1))
    values = network._values(points.flatten(0, 1))
    reached = torch.einsum("snk,nqk->snq", values[network.output].reshape(*points.shape[:2], -1), rows.flatten(2))
    assert torch.all(reached <= bound + 1e-9 * (1 + bound.abs()))
    for node in network.nodes:
        low, high = state.intervals[node.name]
        value = values[node.name].reshape(points.shape[0], *low.shape)
        slack = 1e-9 * (1 + torch.maximum(low.abs(), high.abs()))
        assert torch.all((low - slack <= value) & (value <= high + slack)), node.name
    return state.intervals


@settings(max_examples=EXAMPLES, deadline=None)
@given(centres=st.lists(st.lists(CENTRE, min_size=4, max_size=4), min_size=BOXES_PER_EXAMPLE,
                        max_size=BOXES_PER_EXAMPLE),
       radii=st.lists(RADIUS, min_size=BOXES_PER_EXAMPLE, max_size=BOXES_PER_EXAMPLE))
def test_layer_norm_decomposition_contains_layer_norm_on_random_boxes(layer_norm, centres, radii):
    center, radius = torch.tensor(centres, dtype=torch.float64), torch.tensor(radii, dtype=torch.float64)
    assert [n.op for n in layer_norm.nodes] == ["Sub", "square", "ReduceMean", "rsqrt", "Mul", "Affine"]
    low, high = _contains(layer_norm, center, radius, seed=len(centres))[layer_norm.output]
    box = (center - radius[:, None], center + radius[:, None])
    direct = ops.layer_norm({"epsilon": 1e-5}, torch.from_numpy(SCALE).double(), torch.from_numpy(BIAS).double(),
                            1).rule([box])
    # the decomposition's hull is the direct rule on its (back-substituted, padded) centred interval, not
    # on the input box: equal up to rounding (2.4e-8 seen on a box of radius 0.1 at 0.2)
    assert torch.all(low >= direct[0] - 1e-7 * (1 + direct[0].abs()))
    assert torch.all(high <= direct[1] + 1e-7 * (1 + direct[1].abs()))


@settings(max_examples=EXAMPLES, deadline=None)
@given(centres=st.lists(st.lists(CENTRE, min_size=6, max_size=6), min_size=BOXES_PER_EXAMPLE,
                        max_size=BOXES_PER_EXAMPLE),
       radii=st.lists(RADIUS, min_size=BOXES_PER_EXAMPLE, max_size=BOXES_PER_EXAMPLE))
def test_softmax_decomposition_contains_softmax_on_random_boxes(softmax, centres, radii):
    center = torch.tensor(centres, dtype=torch.float64).reshape(-1, 2, 3)
    radius = torch.tensor(radii, dtype=torch.float64)
    assert [n.op for n in softmax.nodes] == ["Sub", "exp", "ReduceSum", "reciprocal", "Mul"]
    low, high = _contains(softmax, center, radius, seed=len(centres))[softmax.nodes[-2].name]  # before the scale
    box = (center - radius[:, None, None], center + radius[:, None, None])
    direct = ops.softmax(-1).rule([box])
    assert torch.all(low >= direct[0] - 1e-9) and torch.all(high <= direct[1] + 1e-9)
