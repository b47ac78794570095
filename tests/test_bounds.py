"""Linear bound propagation: sound against sampling and PGD, exact inside ReLU cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SHIPPED, const, float_io, make_model, shipped_data, shipped_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from verifier import errors
from verifier.bounds import ops
from verifier.bounds.global_lipschitz import global_lipschitz
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork, forward
from verifier.bounds.propagate import InputSet, propagate
from verifier.bounds.slopes import slope_bounds
from verifier.cells import cell_analysis, displacement_box
from verifier.convert import convert_model
from verifier.convert.normalize import normalize_model
from verifier.data import load_samples
from verifier.geometry import dual_norm
from verifier.onnx_io import load_model

N = helper.make_node
ORDERS = {"inf": math.inf, "2": 2.0, "1": 1.0}


def _project(center: torch.Tensor, moved: torch.Tensor, radius: torch.Tensor, norm: str, box) -> torch.Tensor:
    """A feasible point: scale the displacement into the ball, then clip to the box."""
    delta = (moved - center).flatten(1)
    if norm == "inf":
        delta = torch.maximum(torch.minimum(delta, radius[:, None]), -radius[:, None])
    else:
        size = torch.linalg.vector_norm(delta, ORDERS[norm], dim=1, keepdim=True)
        delta = delta * torch.clamp(radius[:, None] / size.clamp_min(1e-30), max=1.0)
    point = center + delta.reshape(center.shape)
    return point.clamp(*box) if box is not None else point


def _worst_margin(module, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = module(points)
    true = logits.gather(1, labels[:, None])[:, 0]
    return logits.scatter(1, labels[:, None], -math.inf).max(1).values - true


def _attack(module, center, labels, radius, norm, box, steps: int = 30) -> torch.Tensor:
    """Best margin found by random sampling and PGD inside B(center, radius) ∩ box."""
    generator = torch.Generator().manual_seed(0)
    best = _worst_margin(module, center, labels)
    for _ in range(10):
        noise = torch.randn(center.shape, generator=generator, dtype=center.dtype) * radius.reshape(-1, *[1] * (center.dim() - 1))
        best = torch.maximum(best, _worst_margin(module, _project(center, center + noise * 3, radius, norm, box), labels))
    point = center.clone()
    for step in range(steps):
        point.requires_grad_(True)
        loss = _worst_margin(module, point, labels)
        (grad,) = torch.autograd.grad(loss.sum(), point)
        flat = grad.flatten(1)
        if norm == "inf":
            direction = flat.sign()
        elif norm == "2":
            direction = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
        else:
            direction = torch.zeros_like(flat).scatter(1, flat.abs().argmax(1, keepdim=True),
                                                       flat.gather(1, flat.abs().argmax(1, keepdim=True)).sign())
        size = radius[:, None] * (0.5 if step < steps // 2 else 0.1)
        point = _project(center, point.detach() + (direction * size).reshape(center.shape), radius, norm, box)
        best = torch.maximum(best, _worst_margin(module, point, labels).detach())
    return best


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_network_rules_reproduce_the_model(name):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    x = torch.from_numpy(load_samples(shipped_data(name), loaded.info.data_input, limit=20).x).double()
    network = BoundNetwork.from_model(converted)
    assert torch.allclose(network.evaluate(x), converted.logits_module.double()(x), atol=1e-9)


CASES = [("inf", 0.01), ("2", 0.15), ("1", 0.5), ("inf", 0.05)]


@pytest.mark.parametrize("name,norm,radius", [(name, *case) for name in sorted(SHIPPED) for case in CASES
                                               if name.startswith("mlp") or case in CASES[:2]])
def test_margin_bounds_are_sound_on_shipped_models(name, norm, radius):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=24 if name.startswith("mlp") else 8)
    x, y = torch.from_numpy(samples.x).double(), torch.from_numpy(samples.y)
    bounds = margin_bounds(converted, x, y, radius, norm, box=(0.0, 1.0), device="cpu")
    radii = torch.full((len(x),), radius, dtype=torch.float64)
    found = _attack(converted.logits_module.double(), x, y, radii, norm, (0.0, 1.0))
    assert torch.all(found <= bounds.worst_margin + 1e-9)
    clean = _worst_margin(converted.logits_module.double(), x, y)
    assert torch.all(bounds.worst_margin >= clean - 1e-9)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_bounds_equal_the_cell_lp_inside_the_cell(norm):
    loaded = load_model(shipped_model("mlp_relu"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("mlp_relu"), loaded.info.data_input, limit=30)
    cells = cell_analysis(converted, samples.x, samples.y, norm, box=(0.0, 1.0), device="cpu")
    radius = 0.9 * cells.radius
    bounds = margin_bounds(converted, samples.x, samples.y, radius, norm, box=(0.0, 1.0), device="cpu")
    mask = torch.nn.functional.one_hot(cells.labels, 10).bool()
    base = cells.margins.masked_fill(mask, -math.inf).max(1).values
    exact = base + cells.margin_growth(radius[:, None])[:, 0]
    assert torch.allclose(bounds.worst_margin, exact, atol=1e-9)


ACTIVATIONS = {
    "relu": [N("Relu", ["h"], ["a"])],
    "leaky": [N("LeakyRelu", ["h"], ["a"], alpha=0.2)],
    "leaky_negative": [N("LeakyRelu", ["h"], ["a"], alpha=-0.5)],
    "prelu": [N("PRelu", ["h", "slope"], ["a"])],
    "abs": [N("Abs", ["h"], ["a"])],
    "clip": [N("Clip", ["h", "lo", "hi"], ["a"])],
    "gelu": [N("Div", ["h", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
             N("Mul", ["h", "p"], ["q"]), N("Mul", ["q", "half"], ["a"])],
    "silu": [N("Sigmoid", ["h"], ["s"]), N("Mul", ["h", "s"], ["a"])],
    "sigmoid": [N("Sigmoid", ["h"], ["a"])],
    "tanh": [N("Tanh", ["h"], ["a"])],
    "softplus": [N("Softplus", ["h"], ["a"])],
    "hard_swish": [N("HardSwish", ["h"], ["a"])],
}


def _random_net(activation: str, seed: int):
    """x(6) -> Gemm -> act -> MatMul+Add -> act' (+ residual) -> Gemm -> 4 logits."""
    rng = np.random.default_rng(seed)
    first = ACTIVATIONS[activation]
    second = [helper.make_node(n.op_type, [{"h": "h2", "a": "a2"}.get(i, i + "_2" if i in {"d", "e", "p", "q", "s"} else i)
                                          for i in n.input],
                               [{"a": "a2"}.get(o, o + "_2") for o in n.output],
                               **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in first]
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h"], transB=1), *first,
             N("MatMul", ["a", "w2"], ["m"]), N("Add", ["m", "b2"], ["h2"]), *second,
             N("Add", ["a2", "a"], ["res"]), N("Gemm", ["res", "w3", "b3"], ["y"], transB=1)]
    inits = [const("w1", rng.normal(size=(8, 6))), const("b1", rng.normal(size=8) * 0.3),
             const("w2", rng.normal(size=(8, 8)) * 0.5), const("b2", rng.normal(size=8) * 0.3),
             const("w3", rng.normal(size=(4, 8))), const("b3", rng.normal(size=4) * 0.3),
             const("slope", rng.uniform(-0.5, 1.5, size=8)), const("lo", -0.5), const("hi", 1.0),
             const("sqrt2", math.sqrt(2)), const("one", 1.0), const("half", 0.5)]
    used = {t for n in nodes for t in n.input}
    return make_model(nodes, [float_io("x", ["n", 6])], [float_io("y", ["n", 4])], [i for i in inits if i.name in used])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_random_nets_every_activation_sound(tmp_path, activation, norm):
    path = tmp_path / "net.onnx"
    path.write_bytes(_random_net(activation, seed=len(activation)).SerializeToString())
    converted = convert_model(load_model(path))
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(16, 6)))
    y = torch.from_numpy(rng.integers(0, 4, size=16))
    radius = torch.from_numpy(rng.uniform(0.01, 0.6, size=16))
    box = (-1.0, 1.0) if norm != "1" else None
    bounds = margin_bounds(converted, x, y, radius, norm, box=box, device="cpu")
    found = _attack(converted.logits_module.double(), x, y, radius, norm, box, steps=40)
    assert torch.all(found <= bounds.worst_margin + 1e-9)
    # every intermediate interval contains the values at sampled points of the set
    network = BoundNetwork.from_model(converted)
    lower, upper = displacement_box(x, box)
    region = InputSet(center=x, radius=radius, norm=norm, lower=lower, upper=upper)
    state = propagate(network, region)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        point = _project(x, x + torch.randn(x.shape, generator=generator, dtype=x.dtype), radius, norm, box)
        values = {network.input: point}
        for node in network.nodes:
            values[node.name] = forward(node, [values[i] for i in node.inputs])
            low, high = state.intervals[node.name]
            assert torch.all(values[node.name] >= low - 1e-9) and torch.all(values[node.name] <= high + 1e-9), node


def _sample_box(low: torch.Tensor, high: torch.Tensor, count: int, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand((count, *low.shape), generator=generator, dtype=low.dtype)


def test_softmax_and_layer_norm_intervals_contain_samples():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        centre = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64) * 2
        width = torch.rand(2, 3, 7, generator=generator, dtype=torch.float64)
        low, high = centre - width, centre + width
        points = _sample_box(low, high, 400, generator)
        for rule in (ops.softmax(-1), ops.softmax(1, coerce_2d=True),
                     ops.layer_norm({}, torch.rand(7, dtype=torch.float64) - 0.3, torch.randn(7, dtype=torch.float64), 1)):
            bound_low, bound_high = rule.rule([(low, high)])
            values = rule.forward(points.reshape(-1, 3, 7)).reshape(points.shape)
            assert torch.all(values >= bound_low - 1e-12) and torch.all(values <= bound_high + 1e-12)


def test_products_of_two_variables_contain_samples():
    generator = torch.Generator().manual_seed(1)
    a_low = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    b_low = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    a_high, b_high = a_low + torch.rand(4, 3, dtype=torch.float64), b_low + torch.rand(3, 5, dtype=torch.float64)
    low, high = ops.matrix_product().rule([(a_low, a_high), (b_low, b_high)])
    for a, b in zip(_sample_box(a_low, a_high, 300, generator), _sample_box(b_low, b_high, 300, generator)):
        value = a @ b
        assert torch.all(value >= low - 1e-12) and torch.all(value <= high + 1e-12)


def test_op_without_bound_rule_is_named(tmp_path):
    nodes = [N("Gemm", ["x", "w", "b"], ["h"], transB=1), N("Sin", ["h"], ["y"], name="the_sine")]
    model = make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 2])],
                       [const("w", np.ones((2, 3))), const("b", np.zeros(2))])
    path = tmp_path / "sin.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(errors.UnsupportedOpsError, match="unsupported for bounds.*Sin"):
        BoundNetwork.from_model(convert_model(load_model(path)))


def _random_cnn(seed: int):
    """Conv(pads, stride) -> Relu -> MaxPool -> BatchNorm -> two branches (AveragePool | Transpose∘
    Transpose) -> Concat -> Sub -> Flatten -> Gemm: every structural rule on one path."""
    rng = np.random.default_rng(seed)
    nodes = [N("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 0, 1, 2], strides=[1, 2], kernel_shape=[3, 3]),
             N("Relu", ["c"], ["r"]), N("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[1, 1]),
             N("BatchNormalization", ["mp", "g", "bb", "mu", "var"], ["bn"]),
             N("AveragePool", ["bn"], ["ap"], kernel_shape=[1, 1]),
             N("Transpose", ["bn"], ["t1"], perm=[0, 1, 3, 2]), N("Transpose", ["t1"], ["t2"], perm=[0, 1, 3, 2]),
             N("Concat", ["ap", "t2"], ["cat"], axis=1), N("Sub", ["cat", "shift"], ["sub"]),
             N("Flatten", ["sub"], ["f"]), N("Gemm", ["f", "w", "b"], ["y"], transB=1)]
    inits = [const("cw", rng.normal(size=(3, 1, 3, 3))), const("cb", rng.normal(size=3) * 0.2),
             const("g", rng.uniform(0.5, 1.5, size=3)), const("bb", rng.normal(size=3) * 0.2),
             const("mu", rng.normal(size=3) * 0.2), const("var", rng.uniform(0.5, 2, size=3)),
             const("shift", rng.normal(size=(1, 6, 1, 1))), const("w", rng.normal(size=(4, 6 * 5 * 2)) * 0.3),
             const("b", rng.normal(size=4) * 0.1)]
    return make_model(nodes, [float_io("x", ["n", 1, 6, 6])], [float_io("y", ["n", 4])], inits)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["inf", "2", "1"]), scale=st.floats(0.01, 0.5))
def test_random_cnns_sound(tmp_path_factory, seed, norm, scale):
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    path.write_bytes(_random_cnn(seed).SerializeToString())
    converted = convert_model(load_model(path))
    network = BoundNetwork.from_model(converted)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(0, 1, size=(6, 1, 6, 6)))
    assert torch.allclose(network.evaluate(x), converted.logits_module.double()(x), atol=1e-9)
    y = torch.from_numpy(rng.integers(0, 4, size=6))
    radius = torch.full((6,), scale, dtype=torch.float64)
    bounds = margin_bounds(network, x, y, radius, norm, box=(0.0, 1.0), device="cpu")
    found = _attack(converted.logits_module.double(), x, y, radius, norm, (0.0, 1.0), steps=25)
    assert torch.all(found <= bounds.worst_margin + 1e-9)
    slopes = slope_bounds(network, x, y, radius, norm, box=(0.0, 1.0), device="cpu")
    point = _project(x, x + torch.randn(x.shape, dtype=torch.float64), radius, norm, (0.0, 1.0))
    jac = torch.autograd.functional.jacobian(lambda v: converted.logits_module.double()(v).sum(0), point)
    jac = jac.movedim(0, 1).flatten(2)
    gradients = dual_norm(jac - jac[torch.arange(6), y].unsqueeze(1), norm)
    assert torch.all(gradients <= slopes.per_class + 1e-9)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_global_baseline_dominates_exact_growth_and_attacks(norm):
    loaded = load_model(shipped_model("mlp_relu"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("mlp_relu"), loaded.info.data_input, limit=20)
    constant = global_lipschitz(normalize_model(loaded.proto), norm).loss_constant("margin")
    cells = cell_analysis(converted, samples.x, samples.y, norm, box=(0.0, 1.0), device="cpu")
    exact_slope = dual_norm(cells.jacobian - cells.jacobian[torch.arange(20), cells.labels].unsqueeze(1), norm)
    assert torch.all(exact_slope.max(1).values <= constant)
    x, y = torch.from_numpy(samples.x).double(), torch.from_numpy(samples.y)
    radius = torch.full((20,), 0.05, dtype=torch.float64)
    gain = _attack(converted.logits_module.double(), x, y, radius, norm, (0.0, 1.0)) - _worst_margin(
        converted.logits_module.double(), x, y)
    assert torch.all(gain <= constant * 0.05 + 1e-9)


def test_add_of_a_wider_constant_broadcasts_the_variable(tmp_path):
    """x (n, 1) + c (1, 4) copies x into 4 units: margins of `W (x + c)` are linear in x, so the
    bound on the worst l_inf margin is the closed form |W sum|-weighted radius (back-substitution
    sums the copies' adjoints back into x)."""
    c = np.array([[0.5, -1.0, 2.0, 0.0]], dtype=np.float32)
    w = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    nodes = [N("Add", ["x", "c"], ["s"]), N("Gemm", ["s", "w", "b"], ["y"], transB=1)]
    model = make_model(nodes, [float_io("x", ["n", 1])], [float_io("y", ["n", 3])],
                       [const("c", c), const("w", w), const("b", np.zeros(3, dtype=np.float32))])
    path = tmp_path / "wide_add.onnx"
    path.write_bytes(model.SerializeToString())
    converted = convert_model(load_model(path))
    x = np.random.default_rng(6).uniform(size=(5, 1)).astype(np.float32)
    logits = (x + c).astype(np.float64) @ w.T.astype(np.float64)
    y = logits.argmax(1)
    radius = 0.1
    slope = w.astype(np.float64).sum(1)  # d logits / dx
    worst = logits - logits[np.arange(5), y][:, None] + radius * np.abs(slope[None, :] - slope[y][:, None])
    bounds = margin_bounds(converted, x, y, radius=radius, norm="inf", box=None).upper.numpy()
    np.testing.assert_allclose(bounds, worst, atol=1e-5)


def test_pad_with_a_negative_constant_keeps_exact_intervals(tmp_path):
    """Structural ops that add a constant: the padded entries' interval is exactly the constant."""
    nodes = [N("Pad", ["x", "p", "v"], ["px"], mode="constant"), N("Relu", ["px"], ["r"]),
             N("Gemm", ["r", "w", "b"], ["y"], transB=1)]
    model = make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 2])],
                       [const("p", np.array([0, 1, 0, 1])), const("v", np.array(-2.0, dtype=np.float32)),
                        const("w", np.ones((2, 5))), const("b", np.zeros(2))], opset=18)
    path = tmp_path / "pad.onnx"
    path.write_bytes(model.SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    x = torch.rand(4, 3, dtype=torch.float64)
    lower, upper = displacement_box(x, None)
    state = propagate(network, InputSet(x, torch.full((4,), 0.1, dtype=torch.float64), "inf", lower, upper))
    pad = next(n for n in network.nodes if n.op == "Pad")
    low, high = state.intervals[pad.name]
    assert torch.allclose(low[:, [0, 4]], torch.tensor(-2.0, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(high[:, [0, 4]], torch.tensor(-2.0, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(high[:, 1:4] - low[:, 1:4], torch.full((4, 3), 0.2, dtype=torch.float64))


def test_fixed_batch_export_gets_bounds_after_the_rewrite(tmp_path):
    """A torch export with a fixed batch of 1 is rewritten to a dynamic batch: bounds are built
    and reproduce the source module's logits on a batch of 5."""
    import digits_models

    path = tmp_path / "fixed.onnx"
    module = digits_models.build("mlp_relu").eval()
    digits_models.export_onnx(module, "mlp_relu", path, opset=18, dynamo=False, batch=1)
    converted = convert_model(load_model(path))
    assert converted.batch.fixed == 1 and converted.batch.rewritten
    x = torch.rand(5, 64, dtype=torch.float64)
    network = BoundNetwork.from_model(converted)
    assert torch.allclose(network.evaluate(x), module.double()(x), atol=1e-9)


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("net", ["cnn", "mlp"])
def test_tightening_only_unsettled_units_changes_no_bound(monkeypatch, tmp_path, norm, net):
    """Skipping the back-substitution of stable units (and of a first affine layer on a box) must
    give the same margin and slope bounds as tightening every unit of every layer (on the CNN a
    ReLU feeds a MaxPool, whose relaxation reads the ReLU's output interval: nothing is skipped there)."""
    from verifier.bounds import propagate as propagation

    path = tmp_path / "net.onnx"
    path.write_bytes((_random_cnn(7) if net == "cnn" else _random_net("relu", 7)).SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.uniform(0, 1, size=(5, 1, 6, 6) if net == "cnn" else (5, 6)))
    y = torch.from_numpy(rng.integers(0, 4, size=5))
    radius = torch.tensor([0.0, 0.01, 0.05, 0.2, 2.0], dtype=torch.float64)
    selected = margin_bounds(network, x, y, radius, norm, box=(0.0, 1.0), device="cpu").upper
    selected_slopes = slope_bounds(network, x, y, radius, norm, box=(0.0, 1.0), device="cpu").per_class
    skipped = []
    original = propagation._units_worth_tightening
    monkeypatch.setattr(propagation, "_units_worth_tightening",
                        lambda *args: skipped.append(original(*args)) or None)
    every = margin_bounds(network, x, y, radius, norm, box=(0.0, 1.0), device="cpu").upper
    every_slopes = slope_bounds(network, x, y, radius, norm, box=(0.0, 1.0), device="cpu").per_class
    if net == "mlp":
        assert any(mask is not None and not bool(mask.all()) for mask in skipped)  # something was skipped
    assert torch.allclose(selected, every, rtol=1e-10, atol=1e-10)
    assert torch.allclose(selected_slopes, every_slopes, rtol=1e-10, atol=1e-10)


def test_settled_units_lie_in_one_linear_piece():
    from verifier.bounds.relaxations import settled

    low = torch.tensor([-2.0, -1.0, 0.0, 0.5, -4.0, 2.0])
    high = torch.tensor([-1.0, 1.0, 0.0, 3.0, -3.5, 4.0])
    assert settled("relu", low, high).tolist() == [True, False, True, True, True, True]
    assert settled("clip", low, high, {"min": 0.0, "max": 1.0}).tolist() == [True, False, True, False, True, True]
    assert settled("hard_swish", low, high).tolist() == [False, False, False, False, True, False]
    assert not settled("gelu", low, high).any()


def test_transpose_of_a_linear_map_is_its_adjoint():
    from verifier.bounds.adjoints import transpose as _transpose

    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    conv = lambda u: torch.nn.functional.conv2d(u, weight, stride=2, padding=1)  # noqa: E731
    rows = torch.randn(7, 4, 3, 3, dtype=torch.float64)
    dense = torch.autograd.functional.jacobian(lambda u: conv(u.reshape(1, 2, 5, 5)).flatten(),
                                               torch.zeros(50, dtype=torch.float64))
    expected = (rows.flatten(1) @ dense).reshape(7, 2, 5, 5)
    (adjoint,) = _transpose(conv, [torch.zeros(1, 2, 5, 5, dtype=torch.float64)], rows)
    assert torch.allclose(adjoint, expected, atol=1e-12)
    # An op that vmap cannot batch (`.item()` on a batched tensor) takes the whole-batch vjp instead.
    unbatchable = lambda u: u * (u.flatten()[0] * 0 + 2).item()  # noqa: E731
    (doubled,) = _transpose(unbatchable, [torch.zeros(1, 3, dtype=torch.float64)], rows[:, 0, 0])
    assert torch.allclose(doubled, 2 * rows[:, 0, 0], atol=1e-12)
