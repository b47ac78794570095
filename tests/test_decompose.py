"""Softmax, LayerNorm, Div/Pow/Sqrt/Exp/Log/Reciprocal decomposed into relaxed nodes: linear bounds
that hold on dense samples of the input box, intervals at least as tight as the direct rules, and
sound, non-vacuous margin bounds on random tiny Transformers (both torch exporters) and the shipped one."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import const, float_io, make_model, shipped_data, shipped_model
from onnx import helper

from verifier.attacks import attack
from verifier.bounds import decompose, ops
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, propagate, upper_bound
from verifier.cells import displacement_box
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.errors import UnsupportedOpsError
from verifier.losses import loss_values
from verifier.onnx_io import load_model

N = helper.make_node
pytestmark = pytest.mark.usefixtures("one_thread")


def _network(save, nodes, inputs, output_shape, inits=()) -> BoundNetwork:
    model = make_model(nodes, [float_io("x", ["n", *inputs])], [float_io("y", ["n", *output_shape])], list(inits))
    return BoundNetwork.from_model(convert_model(load_model(save(model))))


def _region(center: torch.Tensor, radius: float) -> InputSet:
    lower, upper = displacement_box(center, None)
    return InputSet(center=center, radius=torch.full((len(center),), radius, dtype=center.dtype), norm="inf",
                    lower=lower, upper=upper)


def _box_points(center: torch.Tensor, radius: float, generator, count: int = 2000) -> torch.Tensor:
    """Every vertex of the l_inf box around each centre and random points inside it (S, N, *shape)."""
    units = center[0].numel()
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=units)), dtype=center.dtype)
    inside = torch.rand(count, units, generator=generator, dtype=center.dtype) * 2 - 1
    moves = torch.cat([vertices, inside]) * radius
    return center.unsqueeze(0) + moves.reshape(-1, 1, *center.shape[1:])


def _check_objectives(network: BoundNetwork, center: torch.Tensor, radius: float, generator) -> dict:
    """Random objectives on the output: their bounds hold at dense points of the box; every node's
    interval contains its values there. Returns the state for further checks."""
    region = _region(center, radius)
    state = propagate(network, region)
    out = network.evaluate(center)
    rows = torch.randn(len(center), 5, *out.shape[1:], generator=generator, dtype=center.dtype)
    bound = upper_bound(network, state, region, network.output, rows)
    points = _box_points(center, radius, generator)
    values = network._values(points.flatten(0, 1))
    reached = torch.einsum("snk,nqk->snq", values[network.output].reshape(*points.shape[:2], -1), rows.flatten(2))
    assert torch.all(reached <= bound + 1e-9)
    for node in network.nodes:
        low, high = state.intervals[node.name]
        value = values[node.name].reshape(points.shape[0], *low.shape)
        assert torch.all((low - 1e-9 <= value) & (value <= high + 1e-9)), node.name
    return {"state": state, "bound": bound, "reached": reached}


def test_layer_norm_relaxation_holds_on_dense_samples_and_is_at_least_as_tight(save):
    generator = torch.Generator().manual_seed(0)
    scale, bias = np.array([1.5, -0.7, 0.3, 2.0], np.float32), np.array([0.1, 0.0, -0.4, 0.2], np.float32)
    network = _network(save, [N("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-5)], [4], [4],
                       [const("s", scale), const("b", bias)])
    assert [n.op for n in network.nodes] == ["Sub", "square", "ReduceMean", "rsqrt", "Mul", "Affine"]
    center = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    for radius in (1e-3, 0.05, 0.4):
        result = _check_objectives(network, center, radius, generator)
        low, high = result["state"].intervals[network.output]
        direct = ops.layer_norm({"epsilon": 1e-5}, torch.from_numpy(scale).double(),
                                torch.from_numpy(bias).double(), 1).rule([_region(center, radius).interval()])
        assert torch.all(low >= direct[0] - 1e-9) and torch.all(high <= direct[1] + 1e-9)
    # near a point the linear bound is nearly the sampled maximum (the relaxation is not vacuous)
    result = _check_objectives(network, center, 1e-4, generator)
    assert torch.all(result["bound"] - result["reached"].amax(0) < 1e-3)


def test_layer_norm_outputs_on_a_wide_box_are_bounded_by_their_sphere_exactly(save):
    """On a box so wide that every centred input may be 0, `<a, y>` over y = γ ⊙ ĉ + β is bounded by
    `<a, β> + sqrt(n) ||P(γ ⊙ a)||_2` (eq. 3.8i), a supremum that the direction P(γ ⊙ a) reaches in
    the limit; the per-unit direct interval would give `Σ |γ_k a_k| sqrt(n - 1)`."""
    generator = torch.Generator().manual_seed(3)
    scale, bias = np.array([1.5, -0.7, 0.3, 2.0, 0.9, -1.2], np.float32), np.array([0.1, 0, -0.4, 0.2, 0, 0.5], np.float32)
    network = _network(save, [N("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-5)], [6], [6],
                       [const("s", scale), const("b", bias)])
    gamma, beta = torch.from_numpy(scale).double(), torch.from_numpy(bias).double()
    center = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    region = _region(center, 100.0)
    state = propagate(network, region)
    rows = torch.randn(4, 3, 6, generator=generator, dtype=torch.float64)
    bound = upper_bound(network, state, region, network.output, rows)
    a = rows * gamma
    direction = a - a.mean(-1, keepdim=True)
    sphere = rows @ beta + math.sqrt(6) * direction.norm(dim=-1)
    per_unit = rows @ beta + a.abs().sum(-1) * math.sqrt(5)
    gain, unit_gain = sphere - rows @ beta, per_unit - rows @ beta
    assert torch.all(gain < unit_gain) and gain.sum() < 0.8 * unit_gain.sum()  # the joint bound matters here
    assert torch.allclose(bound, sphere, rtol=1e-7, atol=1e-7)
    # the point whose centred input is 50 along P(γ ⊙ a) reaches it (within eps's effect)
    points = center.mean(-1, keepdim=True).unsqueeze(1) + 50 * direction / direction.norm(dim=-1, keepdim=True)
    assert torch.all((points - center.unsqueeze(1)).abs() <= 100)
    reached = (network.evaluate(points.reshape(-1, 6)).reshape(4, 3, 6) * rows).sum(-1)
    assert torch.all(reached <= bound) and torch.all(bound - reached < 1e-5)
    # nearly constant coefficients: ||P a|| is small against ||a|| (a one-pass Σa² − (Σa)²/n loses it)
    for offset, spread in ((1.0, 3e-8), (1e6, 1e-2)):
        near = (offset + spread * direction[:1, :1] / direction[:1, :1].norm(dim=-1, keepdim=True)) / gamma
        bound = upper_bound(network, state, region, network.output, near.expand(4, 1, 6).clone())
        reached = (network.evaluate(points[:, :1].reshape(-1, 6)) * near[0]).sum(-1, keepdim=True)
        assert torch.all(reached <= bound)


def test_layer_norm_sphere_stays_sound_when_only_some_units_are_flat(save):
    """A Linear map into a LayerNorm: at mid radii some products keep their planes and others are on
    flat lines (bounded jointly by the sphere); dense samples of the box never exceed a bound."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(3, 6, generator=generator).numpy()
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("LayerNormalization", ["h", "s", "b"], ["y"], axis=-1, epsilon=1e-5)]
    scale, bias = np.array([1.5, -0.7, 0.3, 2.0, 0.9, -1.2], np.float32), np.zeros(6, np.float32)
    network = _network(save, nodes, [3], [6], [const("w", weight), const("s", scale), const("b", bias)])
    center = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    mixed = False
    for radius in (0.05, 0.3, 1.0, 3.0, 30.0):
        state = _check_objectives(network, center, radius, generator)["state"]
        flat = state.relaxed[network.nodes[-2].name].flat
        mixed = mixed or bool((flat.flatten(1).any(1) & ~flat.flatten(1).all(1)).any())
    assert mixed  # some sample had both kinds of units at one radius


def _written_layer_norm(opset: int, numerator: str = "c", square: str = "Pow", axes=(-1,)) -> list:
    """LayerNorm as torch's legacy exporter writes it below opset 17 (axes as an input from 18)."""
    def mean(source: str, out: str):
        if opset >= 18:
            return N("ReduceMean", [source, "axes"], [out])
        return N("ReduceMean", [source], [out], axes=list(axes))
    squared = N("Pow", ["c", "two"], ["q"]) if square == "Pow" else N("Mul", ["c", "c"], ["q"])
    return [mean("x", "m"), N("Sub", ["x", "m"], ["c"]), squared, mean("q", "v"), N("Add", ["v", "eps"], ["t"]),
            N("Sqrt", ["t"], ["s"]), N("Div", [numerator, "s"], ["d"]), N("Mul", ["d", "g"], ["gd"]),
            N("Add", ["gd", "b"], ["y"])]


@pytest.mark.parametrize("opset,square", [(16, "Pow"), (18, "Pow"), (16, "Mul")])
def test_a_written_out_layer_norm_gets_the_layer_norm_relaxation(tmp_path, opset, square):
    """The Div of a written-out LayerNorm is bounded as LayerNormalization (direct interval, variance
    floor, sphere): the same bounds as the op at every radius, sound on dense samples."""
    generator = torch.Generator().manual_seed(5)
    scale, bias = np.array([1.5, -0.7, 0.3, 2.0], np.float32), np.array([0.1, 0.0, -0.4, 0.2], np.float32)
    inits = [const("g", scale), const("b", bias), const("two", np.float32(2.0)), const("eps", np.float32(1e-5)),
             const("axes", np.array([-1], np.int64))]
    io = [float_io("x", ["n", 4])], [float_io("y", ["n", 4])]
    written = make_model(_written_layer_norm(opset, square=square), *io, inits, opset=opset)
    fused = make_model([N("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)], *io, inits[:2])
    networks = []
    for name, model in (("written", written), ("fused", fused)):
        (tmp_path / f"{name}.onnx").write_bytes(model.SerializeToString())
        networks.append(BoundNetwork.from_model(convert_model(load_model(tmp_path / f"{name}.onnx"))))
    assert "reciprocal" not in [n.op for n in networks[0].nodes] and "rsqrt" in [n.op for n in networks[0].nodes]
    center = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    rows = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64)
    for radius in (1e-3, 0.3, 5.0):
        region = _region(center, radius)
        bounds = [upper_bound(n, propagate(n, region), region, n.output, rows) for n in networks]
        assert torch.allclose(bounds[0], bounds[1], rtol=1e-9, atol=1e-9)
        _check_objectives(networks[0], center, radius, generator)


@pytest.mark.parametrize("variant", ["rms", "other axes"])
def test_a_norm_that_is_not_a_layer_norm_keeps_the_division_rule(tmp_path, variant):
    """An RMS norm (no centring) or means over different axes is not LayerNorm: Div stays
    `x · 1/y`, still sound."""
    generator = torch.Generator().manual_seed(6)
    if variant == "rms":
        nodes = _written_layer_norm(16)
        nodes[1] = N("Identity", ["x"], ["c"])  # c = x: no centring
        nodes = nodes[1:]
    else:
        nodes = _written_layer_norm(16)
        nodes[3] = N("ReduceMean", ["q"], ["v"], axes=[-2, -1])
    inits = [const("g", np.ones((1, 4), np.float32)), const("b", np.zeros((1, 4), np.float32)),
             const("two", np.float32(2.0)), const("eps", np.float32(1e-5))]
    model = make_model(nodes, [float_io("x", ["n", 2, 4])], [float_io("y", ["n", 2, 4])], inits, opset=16)
    (tmp_path / "norm.onnx").write_bytes(model.SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(tmp_path / "norm.onnx")))
    assert "reciprocal" in [n.op for n in network.nodes]
    center = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    for radius in (1e-3, 0.3):
        _check_objectives(network, center, radius, generator)


def _flax_layer_norm(rows: int, width: int, variant: str) -> tuple[list, list]:
    """LayerNorm over the last axis (of `(n, rows, width)`) as jax2tf writes flax's: means as
    `ReduceSum · 1/n` without kept axes (and with `noop_with_empty_axes`, moot for given axes, as
    magika's), broadcast back by Reshape, variance `Max(0, mean(x²) - m²)`, `Reciprocal(Sqrt(· + eps))`
    times the scale, then `(x - m) ·` it; `variant` changes one piece (see the tests)."""
    inverse = 1.0 / (width - 1 if variant == "wrong count" else width)
    floor = 0.1 if variant == "positive floor" else 0.0
    back = [-1, 1, rows] if variant == "wrong reshape" else [-1, rows, 1]
    inits = [const("axes", np.array([-1], np.int64)), const("inv", np.float32(inverse)),
             const("floor", np.float32(floor)), const("back", np.array(back, np.int64)), const("eps", np.float32(1e-6)),
             const("g", np.linspace(0.5, 1.5, width, dtype=np.float32)), const("b", np.float32(0.25))]
    nodes = [N("ReduceSum", ["x", "axes"], ["s"], keepdims=0, noop_with_empty_axes=1), N("Mul", ["s", "inv"], ["m"]),
             N("Reshape", ["m", "back"], ["mb"]), N("Sub", ["x", "mb"], ["c"])]
    if variant == "two pass":
        nodes += [N("Mul", ["c", "c"], ["cc"]), N("ReduceSum", ["cc", "axes"], ["s2"], keepdims=0),
                  N("Mul", ["s2", "inv"], ["v"])]
    else:
        nodes += [N("Mul", ["x", "x"], ["xx"]), N("ReduceSum", ["xx", "axes"], ["s2"], keepdims=0),
                  N("Mul", ["s2", "inv"], ["e2"]), N("Mul", ["m", "m"], ["mm"]), N("Sub", ["e2", "mm"], ["d"]),
                  N("Max", ["floor", "d"], ["v"])]
    nodes += [N("Reshape", ["v", "back"], ["vb"]), N("Add", ["vb", "eps"], ["t"])]
    if variant == "pow, no scale":
        inits.append(const("power", np.float32(-0.5)))
        nodes += [N("Pow", ["t", "power"], ["rs"]), N("Mul", ["rs", "c"], ["y0"])]
    else:
        nodes += [N("Sqrt", ["t"], ["st"]), N("Reciprocal", ["st"], ["r"]), N("Mul", ["r", "g"], ["rs"]),
                  N("Mul", ["c", "rs"], ["y0"])]
    return nodes + [N("Add", ["y0", "b"], ["y"])], inits


@pytest.mark.parametrize("variant", ["fast", "two pass", "pow, no scale"])
def test_a_flax_layer_norm_gets_the_layer_norm_relaxation(tmp_path, variant):
    """jax2tf's LayerNorm (e.g. magika's) is bounded as LayerNormalization from its centred input on:
    the same bounds as the op at every radius, sound on dense samples, the model's values."""
    generator = torch.Generator().manual_seed(8)
    nodes, inits = _flax_layer_norm(2, 4, variant)  # 1/4 is exact in float32: the same bounds to 1e-9
    io = [float_io("x", ["n", 2, 4])], [float_io("y", ["n", 2, 4])]
    flax = make_model(nodes, *io, inits)
    scale = np.ones(4, np.float32) if variant == "pow, no scale" else np.linspace(0.5, 1.5, 4, dtype=np.float32)
    fused = make_model([N("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)], *io,
                       [const("g", scale), const("b", np.full(4, 0.25, np.float32))])
    networks = []
    for name, model in (("flax", flax), ("fused", fused)):
        (tmp_path / f"{name}.onnx").write_bytes(model.SerializeToString())
        networks.append(BoundNetwork.from_model(convert_model(load_model(tmp_path / f"{name}.onnx"))))
    assert "rsqrt" in [n.op for n in networks[0].nodes]
    assert not {"Sqrt", "Reciprocal", "Max"} & {n.op for n in networks[0].nodes}
    center = torch.randn(4, 2, 4, generator=generator, dtype=torch.float64)
    session = ort.InferenceSession(str(tmp_path / "flax.onnx"))
    reached = session.run(None, {"x": center.float().numpy()})[0]
    assert np.allclose(networks[0].evaluate(center).numpy(), reached, atol=1e-5)
    rows = torch.randn(4, 3, 2, 4, generator=generator, dtype=torch.float64)
    for radius in (1e-3, 0.3, 5.0):
        region = _region(center, radius)
        bounds = [upper_bound(n, propagate(n, region), region, n.output, rows) for n in networks]
        assert torch.allclose(bounds[0], bounds[1], rtol=1e-9, atol=1e-9)
        _check_objectives(networks[0], center, radius, generator)


@pytest.mark.parametrize(("variant", "width"), [("positive floor", 4), ("wrong count", 4), ("wrong reshape", 4),
                                                ("fast", 3)])
def test_a_flax_like_norm_that_is_not_a_layer_norm_keeps_the_product_rules(tmp_path, variant, width):
    """A floor above 0 (not exact on the reals), a mean that is not 1/n of the sum (1/3 for n = 4, or
    float32's rounded 1/3 for n = 3: off centre by 3e-8 mean(x), unbounded on R^d), or means broadcast
    back along the wrong axis (caught by the probe, not the pattern) keep `sqrt`, `reciprocal` and the
    products: the model's values, still sound."""
    generator = torch.Generator().manual_seed(9)
    nodes, inits = _flax_layer_norm(width, width, variant)
    io = [float_io("x", ["n", width, width])], [float_io("y", ["n", width, width])]
    (tmp_path / "norm.onnx").write_bytes(make_model(nodes, *io, inits).SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(tmp_path / "norm.onnx")))
    assert {"Sqrt", "Reciprocal", "Max"} <= {n.op for n in network.nodes} and "rsqrt" not in [n.op for n in network.nodes]
    center = torch.randn(3, width, width, generator=generator, dtype=torch.float64)
    reached = ort.InferenceSession(str(tmp_path / "norm.onnx")).run(None, {"x": center.float().numpy()})[0]
    assert np.allclose(network.evaluate(center).numpy(), reached, atol=1e-4)
    for radius in (1e-3, 0.1):
        _check_objectives(network, center, radius, generator)


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_relaxation_holds_on_dense_samples_and_is_at_least_as_tight(save, axis):
    generator = torch.Generator().manual_seed(1)
    nodes = [N("Softmax", ["x"], ["p"], axis=axis), N("Mul", ["p", "k"], ["y"])]  # a last Softmax is a head
    network = _network(save, nodes, [2, 3], [2, 3], [const("k", np.float32(-2.0))])
    moved = ["Transpose"] * (axis == 1)
    assert [n.op for n in network.nodes] == ["Sub", "exp", "ReduceSum", "reciprocal", *moved, "Mul"]
    center = 2 * torch.randn(5, 2, 3, generator=generator, dtype=torch.float64)
    for radius in (1e-3, 0.1, 0.8):
        state = _check_objectives(network, center, radius, generator)["state"]
        low, high = state.intervals[network.nodes[-2].name]
        direct = ops.softmax(axis).rule([_region(center, radius).interval()])
        assert torch.all(low >= direct[0] - 1e-9) and torch.all(high <= direct[1] + 1e-9)


def test_hand_written_norm_and_elementary_ops_are_relaxed_soundly(save):
    """(h - mean) / Sqrt(mean(Pow(h - mean, 2)) + eps) (relaxed as LayerNorm: rsqrt), Exp, Log, Sqrt,
    Reciprocal, Div by a variable, x * x."""
    rng = np.random.default_rng(2)
    nodes = [N("Gemm", ["x", "w", "c"], ["h"], transB=1),
             N("ReduceMean", ["h"], ["m"], axes=[-1]), N("Sub", ["h", "m"], ["d"]),
             N("Pow", ["d", "two"], ["p"]), N("ReduceMean", ["p"], ["v"], axes=[-1]),
             N("Add", ["v", "eps"], ["ve"]), N("Sqrt", ["ve"], ["s"]), N("Div", ["d", "s"], ["n"]),
             N("Exp", ["n"], ["e"]), N("Add", ["e", "one"], ["e1"]), N("Log", ["e1"], ["sp"]),
             N("Reciprocal", ["e1"], ["r"]), N("Div", ["one", "e1"], ["r2"]), N("Mul", ["r", "r2"], ["rr"]),
             N("Mul", ["sp", "sp"], ["sq"]), N("Sqrt", ["e1"], ["rt"]),
             N("Concat", ["sp", "rr", "sq", "rt"], ["y"], axis=-1)]
    inits = [const("w", rng.normal(size=(3, 3))), const("c", rng.normal(size=3)), const("two", 2.0),
             const("eps", 1e-5), const("one", 1.0)]
    network = _network(save, nodes, [3], [12], inits)
    kinds = {getattr(n.rule, "kind", type(n.rule).__name__) for n in network.nodes}
    assert {"square", "rsqrt", "sqrt", "reciprocal", "exp", "log", "Product"} <= kinds
    center = torch.from_numpy(rng.uniform(-1, 1, size=(4, 3)))
    for radius in (1e-3, 0.05, 0.3):
        _check_objectives(network, center, radius, torch.Generator().manual_seed(3))


def test_real_exponent_powers_are_relaxed_soundly(save):
    """Pow(s, 1.5), Pow(s, 0.5 + 0.25), Pow(s, -2), Pow(s, -0.7) of s = softplus-like positive units."""
    rng = np.random.default_rng(4)
    nodes = [N("Gemm", ["x", "w", "c"], ["h"], transB=1), N("Exp", ["h"], ["e"]), N("Add", ["e", "one"], ["s"]),
             N("Pow", ["s", "a"], ["p1"]), N("Pow", ["s", "b"], ["p2"]), N("Pow", ["s", "m2"], ["p3"]),
             N("Pow", ["s", "m07"], ["p4"]), N("Concat", ["p1", "p2", "p3", "p4"], ["y"], axis=-1)]
    inits = [const("w", rng.normal(size=(3, 3))), const("c", rng.normal(size=3)), const("one", 1.0),
             const("a", 1.5), const("b", 0.75), const("m2", -2.0), const("m07", -0.7)]
    network = _network(save, nodes, [3], [12], inits)
    exponents = sorted(n.rule.params["exponent"] for n in network.nodes if getattr(n.rule, "kind", "") == "power")
    assert exponents == pytest.approx([-2.0, -0.7, 0.75, 1.5])  # (float32 constants)
    center = torch.from_numpy(rng.uniform(-1, 1, size=(4, 3)))
    for radius in (1e-3, 0.05, 0.3):
        result = _check_objectives(network, center, radius, torch.Generator().manual_seed(5))
        if radius == 1e-3:  # linear, not flat: the bound is within a few % of the sampled maximum's excess
            reached = result["reached"].amax(0)
            gap = (result["bound"] - reached) / (reached - result["reached"].amin(0))
            assert float(gap.max()) < 0.05


_MASK = np.array([[0.0, -np.inf, 0.0], [-np.inf, 0.0, 0.0]], np.float32)  # every row and column keeps one


@pytest.mark.parametrize("form, axis", [("add", -1), ("add", 1), ("where", -1), ("where-true", 1)])
def test_a_minus_inf_attention_mask_is_dropped_by_its_softmax(save, form, axis):
    """Add(scores, mask) or Where(cond, scores, -inf) into a Softmax (over the last axis or, moved, the
    first): the network computes the model's softmax (masked entries exactly 0, where a -inf in the
    bounds gave NaN before) and its linear bounds hold on dense samples."""
    rng = np.random.default_rng(6)
    kept = np.isfinite(_MASK)
    nodes = [N("Gemm", ["x", "w", "c"], ["h"], transB=1), N("Reshape", ["h", "shape"], ["s"])]
    inits = [const("w", rng.normal(size=(6, 3))), const("c", rng.normal(size=6)),
             const("shape", np.array([-1, 2, 3], np.int64)), const("flat", np.array([-1, 4], np.int64))]
    if form == "add":
        nodes.append(N("Add", ["s", "mask"], ["m"]))
        inits.append(const("mask", _MASK))
    elif form == "where":
        nodes.append(N("Where", ["keep", "s", "minus"], ["m"]))
        inits += [const("keep", kept), const("minus", np.float32(-np.inf))]
    else:  # the variable where the condition is False
        nodes.append(N("Where", ["drop", "minus", "s"], ["m"]))
        inits += [const("drop", ~kept), const("minus", np.float32(-np.inf))]
    # softmax · V, then flat: a Softmax inside the logits' path (a last one would be read as the head)
    nodes += [N("Softmax", ["m"], ["p"], axis=axis), N("MatMul", ["p", "v"], ["pv"]), N("Reshape", ["pv", "flat"], ["y"])]
    inits.append(const("v", rng.normal(size=(3, 2))))
    model = make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 4])], inits)
    path = save(model)
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    center = torch.from_numpy(rng.uniform(-1, 1, size=(4, 3)))
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"x": center.numpy().astype(np.float32)})[0]
    values = network.values(center)
    assert np.allclose(values[network.output].numpy().reshape(expected.shape), expected, atol=1e-5)
    softmax = next(n.name for n in network.nodes if n.op == "MatMul")  # the node before softmax · V
    probabilities = values[network.nodes[[n.name for n in network.nodes].index(softmax) - 1].name]
    assert torch.all(probabilities[:, ~torch.from_numpy(kept)] == 0)
    assert torch.allclose(probabilities.sum(axis), torch.ones((), dtype=torch.float64), atol=1e-12)
    for radius in (1e-3, 0.1, 0.6):
        result = _check_objectives(network, center, radius, torch.Generator().manual_seed(7))
        assert torch.isfinite(result["bound"]).all()


def test_a_mask_on_a_softmax_too_wide_for_pairs_is_refused_not_dropped(save):
    """Over more than PAIRWISE_LIMIT entries the Softmax keeps its interval rule, which knows no mask:
    the -inf Add must then be refused (its 0 stand-ins would be normalised over)."""
    width = decompose.PAIRWISE_LIMIT + 8
    mask = np.where(np.arange(width) % 2 == 0, 0.0, -np.inf).astype(np.float32)
    nodes = [N("Gemm", ["x", "w", "c"], ["h"], transB=1), N("Add", ["h", "mask"], ["m"]),
             N("Softmax", ["m"], ["p"], axis=-1), N("MatMul", ["p", "v"], ["y"])]
    rng = np.random.default_rng(10)
    inits = [const("w", rng.normal(size=(width, 3))), const("c", rng.normal(size=width)), const("mask", mask),
             const("v", rng.normal(size=(width, 2)))]
    model = make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 2])], inits)
    with pytest.raises(UnsupportedOpsError, match="infinite constant"):
        BoundNetwork.from_model(convert_model(load_model(save(model))))


def test_where_with_a_constant_condition_selects_exactly(save):
    """Where(cond, h, g) of two variables and Where(cond, 2.5, h): affine, so a tiny box bounds them tightly."""
    rng = np.random.default_rng(8)
    cond = np.array([True, False, True, False])
    nodes = [N("Gemm", ["x", "w", "c"], ["h"], transB=1), N("Exp", ["h"], ["g"]),
             N("Where", ["cond", "h", "g"], ["a"]), N("Where", ["cond", "k", "h"], ["b"]),
             N("Concat", ["a", "b"], ["y"], axis=-1)]
    inits = [const("w", rng.normal(size=(4, 3))), const("c", rng.normal(size=4)), const("cond", cond),
             const("k", np.float32(2.5))]
    model = make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 8])], inits)
    path = save(model)
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    assert [n.op for n in network.nodes].count("Where") == 2
    center = torch.from_numpy(rng.uniform(-1, 1, size=(3, 3)))
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"x": center.numpy().astype(np.float32)})[0]
    assert np.allclose(network.evaluate(center).numpy(), expected, atol=1e-5)
    for radius in (1e-3, 0.2):
        _check_objectives(network, center, radius, torch.Generator().manual_seed(9))
    low, high = propagate(network, _region(center, 0.2)).intervals[network.output]
    assert torch.allclose(low[:, [4, 6]], torch.full((3, 2), 2.5, dtype=torch.float64), rtol=1e-10, atol=0)
    assert torch.allclose(high[:, [4, 6]], torch.full((3, 2), 2.5, dtype=torch.float64), rtol=1e-10, atol=0)


class _Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, norm: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.proj = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        self.ln1 = torch.nn.LayerNorm(dim) if norm else torch.nn.Identity()
        self.ln2 = torch.nn.LayerNorm(dim) if norm else torch.nn.Identity()

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.ln1(h)
        q, k, v = self.split(self.q(a)), self.split(self.k(a)), self.split(self.v(a))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(h.shape))
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))


class _TinyTransformer(torch.nn.Module):
    def __init__(self, tokens: int, features: int, dim: int, heads: int, blocks: int, norm: bool) -> None:
        super().__init__()
        self.tokens, self.features = tokens, features
        self.embed = torch.nn.Linear(features, dim)
        self.blocks = torch.nn.ModuleList(_Block(dim, heads, norm) for _ in range(blocks))
        self.head = torch.nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.features))
        for block in self.blocks:
            h = block(h)
        return self.head(h.sum(1))


def _export(module: torch.nn.Module, inputs: int, path, dynamo: bool) -> None:
    example = torch.zeros(2, inputs)
    if dynamo:
        program = torch.onnx.export(module, (example,), input_names=["x"], output_names=["y"], opset_version=18,
                                    dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        program.save(str(path), external_data=False)
    else:
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                          dynamo=False, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})


def _attacked(module, x: torch.Tensor, y: torch.Tensor, radius: float, box=(-math.inf, math.inf),
              steps: int = 30) -> torch.Tensor:
    """Best margin of random sampling and sign-PGD in the l_inf ball ∩ box."""
    generator = torch.Generator().manual_seed(0)
    best = loss_values(module(x), y, "margin").detach()
    for _ in range(20):
        point = (x + radius * (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1)).clamp(*box)
        best = torch.maximum(best, loss_values(module(point), y, "margin").detach())
    point = x.clone()
    for step in range(steps):
        point.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_values(module(point), y, "margin").sum(), point)
        size = radius * (0.5 if step < steps // 2 else 0.1)
        point = (x + (point.detach() + size * grad.sign() - x).clamp(-radius, radius)).clamp(*box).detach()
        best = torch.maximum(best, loss_values(module(point), y, "margin").detach())
    return best


@pytest.mark.parametrize("dynamo, dim, heads, blocks, norm", [
    (False, 4, 1, 1, True), (False, 8, 2, 2, True), (False, 16, 2, 1, False),
    (True, 4, 1, 1, True), (True, 8, 2, 1, True), (True, 16, 2, 1, False)],
    ids=["legacy-4-ln", "legacy-8-2blocks", "legacy-16-noln", "dynamo-4-ln", "dynamo-8-ln", "dynamo-16-noln"])
def test_random_tiny_transformers_sound_and_not_vacuous(tmp_path, dynamo, dim, heads, blocks, norm):
    torch.manual_seed(dim + blocks)
    module = _TinyTransformer(tokens=3, features=2, dim=dim, heads=heads, blocks=blocks, norm=norm).eval()
    path = tmp_path / "tiny.onnx"
    _export(module, 6, path, dynamo)
    converted = convert_model(load_model(path))
    network = BoundNetwork.from_model(converted)
    assert not any(type(n.rule) is ops.Interval for n in network.nodes)  # every op passes linear bounds
    rng = np.random.default_rng(dim)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(6, 6)))
    double = module.double()
    y = double(x).argmax(1)
    clean = loss_values(double(x), y, "margin").detach()
    for radius in (0.05, 0.002):
        bounds = margin_bounds(network, x, y, radius, "inf", device="cpu")
        found = _attacked(double, x, y, radius)
        assert torch.all(clean <= found + 1e-12) and torch.all(found <= bounds.worst_margin + 1e-9)
    # at a tiny radius the bound's excess over the clean margin is close to the attack's (measured
    # 1.001-1.022x on these four); interval-only attention and LayerNorm are far above
    gain = (found - clean).mean()
    assert float((bounds.worst_margin - clean).mean()) < 1.5 * float(gain)


def test_random_tiny_transformer_certificate_is_above_the_attacks(tmp_path):
    """certify (W_2, l_inf cost, CE) on a random Transformer (dynamo export): its own realising
    distribution and PGD / W-PGD at every delta stay below the certificate, which stays below the
    whole-box bound (measured 0.346 / 2.34 against attacks 0.265 / 0.274 and a whole box of 8.45)."""
    torch.manual_seed(3)
    module = _TinyTransformer(tokens=3, features=2, dim=4, heads=1, blocks=1, norm=True).eval()
    path = tmp_path / "tiny.onnx"
    _export(module, 6, path, dynamo=True)
    loaded = load_model(path)
    converted = convert_model(loaded)
    x = np.random.default_rng(3).uniform(0, 1, size=(4, 6)).astype(np.float32)
    y = module(torch.from_numpy(x)).argmax(1).numpy()
    deltas = [0.01, 0.05]
    certified = certify(converted, x, y, deltas, p=2.0, norm="inf", loss="ce", box=(0.0, 1.0), grid_points=2,
                        exact="off")
    attacked = attack(converted, loaded, x, y, ["pgd", "wpgd"], deltas, p=2.0, norm="inf", loss="ce",
                      box=(0.0, 1.0), steps=20, seed=0, device="cpu")
    whole = margin_bounds(converted, x, y, math.inf, "inf", box=(0.0, 1.0), device="cpu").upper
    whole_box = float(torch.logsumexp(whole, 1).mean())
    for row in certified.results:
        found = max([r.risk for r in attacked.results if r.delta == row.delta] + [row.realised_risk])
        assert row.clean_risk <= found + 1e-9 and found <= row.certificate + 1e-6
        assert row.certificate < whole_box


@pytest.mark.parametrize("form", ["op", "flax"])
def test_a_layer_norm_before_the_head_bounds_the_certificate_without_a_box(tmp_path, form):
    """Gemm -> LayerNorm -> Gemm with no box: the logits are bounded on all of R^d, so the W_2 CE
    certificate is finite (its tail is the whole-space bound, where it was inf), above W-PGD and PGD,
    at most the whole-space bound and within 4x the attack's gain; both LayerNorm forms give the same."""
    rng = np.random.default_rng(12)
    if form == "op":
        norm = [N("LayerNormalization", ["h3", "g", "b"], ["n3"], axis=-1, epsilon=1e-6)]
        extra = [const("g", np.linspace(0.5, 1.5, 4, dtype=np.float32)), const("b", np.float32(0.25) * np.ones(4))]
    else:
        norm, extra = _flax_layer_norm(1, 4, "fast")
        norm = [N(n.op_type, [{"x": "h3"}.get(t, t) for t in n.input], [{"y": "n3"}.get(t, t) for t in n.output],
                  **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in norm]
    shape = [const("rows", np.array([-1, 1, 4], np.int64)), const("flat", np.array([-1, 4], np.int64))]
    nodes = [N("Gemm", ["x", "w1", "c1"], ["h"], transB=1), N("Reshape", ["h", "rows"], ["h3"]), *norm,
             N("Reshape", ["n3", "flat"], ["n"]), N("Gemm", ["n", "w2", "c2"], ["y"], transB=1)]
    inits = [const("w1", rng.normal(size=(4, 5))), const("c1", rng.normal(size=4)), const("w2", rng.normal(size=(3, 4))),
             const("c2", rng.normal(size=3)), *shape, *extra]
    (tmp_path / "ln.onnx").write_bytes(make_model(nodes, [float_io("x", ["n", 5])], [float_io("y", ["n", 3])],
                                                  inits).SerializeToString())
    loaded = load_model(tmp_path / "ln.onnx")
    converted = convert_model(loaded)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = np.argmax(ort.InferenceSession(str(tmp_path / "ln.onnx")).run(None, {"x": x})[0], 1)
    deltas = [0.01, 0.05]
    certified = certify(converted, x, y, deltas, p=2.0, norm="2", loss="ce", box=None, grid_points=4, exact="off")
    attacked = attack(converted, loaded, x, y, ["pgd", "wpgd"], deltas, p=2.0, norm="2", loss="ce", box=None,
                      steps=30, seed=0, device="cpu")
    whole = margin_bounds(converted, x, y, math.inf, "2", box=None, device="cpu").upper
    whole_space = float(torch.logsumexp(whole, 1).mean())
    assert math.isfinite(whole_space)
    for row in certified.results:
        found = max([r.risk for r in attacked.results if r.delta == row.delta] + [row.realised_risk])
        assert row.clean_risk <= found + 1e-9 and found <= row.certificate + 1e-6
        assert math.isfinite(row.certificate) and row.certificate <= whole_space * (1 + 1e-5)
    # the grid's doublings past sqrt(N) delta bound the far mass (without them: 13.8x the attack at 0.05)
    row = certified.results[-1]
    found = max([r.risk for r in attacked.results if r.delta == row.delta] + [row.realised_risk])
    assert row.certificate - row.clean_risk <= 4 * (found - row.clean_risk)


def test_shipped_transformer_bound_is_sound_and_not_vacuous():
    loaded = load_model(shipped_model("transformer"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("transformer"), loaded.info.data_input, limit=4)
    x, y = torch.from_numpy(samples.x).double(), torch.from_numpy(samples.y).long()
    network = BoundNetwork.from_model(converted)
    module = converted.logits_module.double()
    clean = loss_values(module(x), y, "margin").detach()
    radius = 1 / 255
    bound = margin_bounds(network, x, y, radius, "inf", box=(0.0, 1.0), device="cpu").worst_margin
    whole = margin_bounds(network, x, y, math.inf, "inf", box=(0.0, 1.0), device="cpu").worst_margin
    found = _attacked(module, x, y, radius, box=(0.0, 1.0))
    assert torch.all(clean <= found + 1e-12) and torch.all(found <= bound + 1e-9)
    assert torch.all(bound < whole)
    assert float((bound - clean).mean()) < 2.5 * float((found - clean).mean())  # measured 1.6x PGD on 8 samples


@pytest.mark.parametrize("axis, coerce_2d", [(1, True), (2, True), (-1, False), (1, False)])
def test_softmax_parts_compute_the_softmax(axis, coerce_2d):
    """The chain of parts reproduces Softmax (opset < 13 coerces the axes from `axis` on to one)."""
    x = torch.randn(4, 2, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    values = {0: x}
    for part in decompose.softmax(axis, coerce_2d, [2, 3, 5]):
        rule = part.rule
        inputs = [values[ref] for ref in part.inputs]
        values[part.suffix] = rule(*inputs) if isinstance(rule, ops.Affine) else rule.forward(*inputs)
    assert torch.allclose(values[""], ops.softmax(axis, coerce_2d).forward(x), atol=1e-14)
