"""Global Lipschitz baseline (method §3.1): closed forms, exact operator norms, soundness."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SHIPPED, const, float_io, make_model, shipped_data, shipped_model
from onnx import helper
from scipy.special import erf

from verifier.bounds.global_lipschitz import ACTIVATION_CONSTANTS, LOSS_LIP_Z, GlobalLipschitz, global_lipschitz
from verifier.convert import convert_model
from verifier.convert.normalize import NormalizedModel, normalize_model
from verifier.errors import UsageError
from verifier.onnx_io import load_model

N = helper.make_node
NORMS = ("inf", "2", "1")
RNG = np.random.default_rng(7)


def _f32(a) -> np.ndarray:
    """float64 copy of the float32 value an initializer stores."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _op_norm(a: np.ndarray, norm: str) -> float:
    """Exact induced norm of a dense matrix [out, in]."""
    a = np.asarray(a, dtype=np.float64)
    if norm == "inf":
        return float(np.abs(a).sum(axis=1).max())
    if norm == "1":
        return float(np.abs(a).sum(axis=0).max())
    return float(np.linalg.norm(a, 2))


def _vec_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of the flattened tensors."""
    return torch.linalg.vector_norm(v.flatten(1), ord={"inf": math.inf, "2": 2, "1": 1}[norm], dim=1)


def _shaped(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its output shapes filled in by shape inference."""
    return onnx.shape_inference.infer_shapes(model)


def _bounds(path) -> dict[str, GlobalLipschitz]:
    normalized = normalize_model(load_model(path).proto)
    return {r: global_lipschitz(normalized, r) for r in NORMS}


def _dense(path, in_shape) -> np.ndarray:
    """The matrix [out, in] of a linear (affine) ONNX model, from onnxruntime on basis vectors."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    d = int(np.prod(in_shape))
    name = session.get_inputs()[0].name
    basis = np.eye(d, dtype=np.float32).reshape(d, *in_shape)
    zero = np.zeros((1, *in_shape), np.float32)
    out = session.run(None, {name: basis})[0].reshape(d, -1) - session.run(None, {name: zero})[0].reshape(1, -1)
    return out.T.astype(np.float64)


# ---------------------------------------------------------------- closed forms


def _gemm_model(w, trans_b=1, alpha=1.0):
    out = w.shape[0] if trans_b else w.shape[1]
    nodes = [N("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b, alpha=alpha)]
    return make_model(nodes, [float_io("x", ["n", w.shape[1] if trans_b else w.shape[0]])], [float_io("y", ["n", out])],
                      [const("w", w), const("b", RNG.normal(size=out))])


@pytest.mark.parametrize("trans_b,alpha", [(1, 1.0), (0, -2.5)])
def test_single_gemm_is_the_exact_operator_norm(save, trans_b, alpha):
    w = RNG.normal(size=(4, 6))
    bounds = _bounds(save(_gemm_model(w, trans_b, alpha)))
    m = abs(np.float32(alpha)) * (_f32(w) if trans_b else _f32(w).T)  # y = M x
    assert bounds["inf"].logits_constant == float(np.abs(m).sum(axis=1).max())
    assert bounds["1"].logits_constant == float(np.abs(m).sum(axis=0).max())
    sigma = np.linalg.svd(m, compute_uv=False)[0]
    assert sigma <= bounds["2"].logits_constant <= sigma * (1 + 2e-6)
    assert bounds["2"].per_node == {"fc": bounds["2"].logits_constant}


def test_gemm_relu_gemm_is_the_product(save):
    w1, w2 = RNG.normal(size=(8, 5)), RNG.normal(size=(3, 8))
    nodes = [N("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1), N("Relu", ["h"], ["r"], name="relu"),
             N("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    model = make_model(nodes, [float_io("x", ["n", 5])], [float_io("y", ["n", 3])], [const("w1", w1), const("w2", w2)])
    for r, bound in _bounds(save(model)).items():
        expected = _op_norm(_f32(w1), r) * _op_norm(_f32(w2), r)
        assert bound.logits_constant == pytest.approx(expected, rel=3e-6 if r == "2" else 1e-12)
        assert bound.logits_constant >= expected
        assert bound.per_node["relu"] == 1.0 and bound.unbounded_at == ()


def test_residual_adds_the_constants(save):
    w = RNG.normal(size=(5, 5))
    nodes = [N("Gemm", ["x", "w"], ["h"], name="fc", transB=1), N("Add", ["x", "h"], ["y"], name="res")]
    model = make_model(nodes, [float_io("x", ["n", 5])], [float_io("y", ["n", 5])], [const("w", w)])
    for r, bound in _bounds(save(model)).items():
        assert bound.logits_constant == pytest.approx(1 + _op_norm(_f32(w), r), rel=3e-6)
        assert bound.logits_constant >= 1 + _op_norm(_f32(w), r)


def test_batch_norm_is_the_largest_channel_scale(save):
    g, var = RNG.normal(size=3), RNG.uniform(0.1, 2, size=3)
    nodes = [N("BatchNormalization", ["x", "g", "b", "mu", "var"], ["y"], name="bn", epsilon=1e-3)]
    inits = [const("g", g), const("b", RNG.normal(size=3)), const("mu", RNG.normal(size=3)), const("var", var)]
    model = make_model(nodes, [float_io("x", ["n", 3, 2, 2])], [float_io("y", ["n", 3, 2, 2])], inits)
    expected = float(np.max(np.abs(_f32(g)) / np.sqrt(_f32(var) + np.float32(1e-3))))
    for bound in _bounds(save(model)).values():
        assert bound.logits_constant == pytest.approx(expected, rel=1e-7)


CONV_CASES = {
    "no_padding": dict(kernel_shape=[3, 3]),
    "padded_strided": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
    "grouped_dilated": dict(kernel_shape=[2, 2], pads=[1, 0, 0, 1], dilations=[2, 1], group=2),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_bounds_the_unrolled_operator(save, case):
    attrs = CONV_CASES[case]
    groups = attrs.get("group", 1)
    w = RNG.normal(size=(4, 2 // groups, *attrs["kernel_shape"]))
    nodes = [N("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)]
    model = _shaped(make_model(nodes, [float_io("x", ["n", 2, 6, 5])], [float_io("y", None)],
                               [const("w", w), const("b", RNG.normal(size=4))]))
    path = save(model)
    module = convert_model(load_model(path)).logits_module.double()
    x = torch.zeros(1, 2, 6, 5, dtype=torch.float64)
    dense = torch.func.jacrev(lambda v: module(v).flatten())(x).reshape(-1, x.numel()).detach().numpy()
    assert np.allclose(dense, _dense(path, (2, 6, 5)), atol=1e-5)  # torch's matrix is onnxruntime's
    for r, bound in _bounds(path).items():
        exact = _op_norm(dense, r)
        assert bound.logits_constant >= exact * (1 - 1e-12), (r, bound.logits_constant, exact)
        if r == "inf" and case == "no_padding":
            assert bound.logits_constant == pytest.approx(exact, rel=1e-12)


def _max_pool_model(in_shape, **attrs):
    nodes = [N("MaxPool", ["x"], ["y"], name="pool", **attrs)]
    return _shaped(make_model(nodes, [float_io("x", ["n", *in_shape])], [float_io("y", None)]))


def test_overlapping_max_pool_is_exact_by_brute_force(save):
    """2x2 windows, stride 1, on 3x3: the Lipschitz constant is the max over argmax choices."""
    path = save(_max_pool_model((1, 3, 3), kernel_shape=[2, 2], strides=[1, 1]))
    bounds = _bounds(path)
    windows = [[(i + a) * 3 + (j + b) for a in (0, 1) for b in (0, 1)] for i in (0, 1) for j in (0, 1)]
    exact = {r: 0.0 for r in NORMS}
    for choice in itertools.product(*windows):  # one linear piece per argmax pattern
        select = np.zeros((4, 9))
        select[range(4), choice] = 1.0
        for r in NORMS:
            exact[r] = max(exact[r], _op_norm(select, r))
    assert exact == {"inf": 1.0, "2": 2.0, "1": 4.0}
    for r in NORMS:
        assert bounds[r].logits_constant == pytest.approx(exact[r], rel=1e-12)
    module = convert_model(load_model(path)).logits_module
    spike = torch.zeros(1, 1, 3, 3)
    spike[0, 0, 1, 1] = 0.5  # the centre is in all four windows
    for r in NORMS:
        ratio = _vec_norm(module(spike) - module(torch.zeros_like(spike)), r) / _vec_norm(spike, r)
        assert float(ratio) == pytest.approx(bounds[r].logits_constant, rel=1e-6)


@pytest.mark.parametrize("attrs,in_shape,m", [
    (dict(kernel_shape=[3], strides=[1]), (2, 7), 3),
    (dict(kernel_shape=[3], strides=[2], pads=[1, 1]), (2, 7), 2),
    (dict(kernel_shape=[2, 3], strides=[2, 1]), (1, 4, 6), 3),
    (dict(kernel_shape=[2], strides=[1], dilations=[2]), (1, 6), 2),
])
def test_max_pool_windows_per_input(save, attrs, in_shape, m):
    bounds = _bounds(save(_max_pool_model(in_shape, **attrs)))
    assert [bounds[r].logits_constant for r in NORMS] == pytest.approx([1.0, math.sqrt(m), m])


LINEAR_CASES = {  # name: (opset, nodes, initializers, input shape without batch, exact in every norm)
    "matmul_right_3d": (17, [N("MatMul", ["x", "w"], ["y"])], [const("w", RNG.normal(size=(4, 3)))], (5, 4), True),
    "matmul_left": (17, [N("MatMul", ["w", "x"], ["y"])], [const("w", RNG.normal(size=(3, 5)))], (5, 2), True),
    "matmul_batched_weight": (17, [N("MatMul", ["x", "w"], ["y"])], [const("w", RNG.normal(size=(2, 4, 3)))],
                              (2, 3, 4), False),
    "concat_x_2x": (17, [N("Mul", ["x", "two"], ["d"]), N("Concat", ["x", "d"], ["y"], axis=1)],
                    [const("two", np.array(2.0))], (4,), True),
    "gather_duplicates": (17, [N("Gather", ["x", "i"], ["y"], axis=1)], [const("i", np.array([0, 2, 2, -1, 1]))],
                          (3,), True),
    "tile": (17, [N("Tile", ["x", "k"], ["y"])], [const("k", np.array([1, 3]))], (2,), True),
    "broadcast_add": (17, [N("Unsqueeze", ["x", "ax"], ["u"]), N("Add", ["u", "z"], ["y"])],
                      [const("ax", np.array([1])), const("z", np.zeros((3, 4)))], (4,), True),
    "reduce_sum": (18, [N("ReduceSum", ["x", "ax"], ["y"], keepdims=0)], [const("ax", np.array([1]))], (5, 2), True),
    "reduce_mean": (18, [N("ReduceMean", ["x", "ax"], ["y"], keepdims=0)], [const("ax", np.array([2]))], (2, 6),
                    True),
    "global_average_pool": (17, [N("GlobalAveragePool", ["x"], ["y"])], [], (2, 3, 3), True),
    "avg_pool_overlap": (19, [N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2])], [], (1, 4, 4), False),
    "avg_pool_pad_exclude_ceil": (19, [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 2],
                                         pads=[1, 1, 1, 0], ceil_mode=1)], [], (1, 5, 4), False),
    "avg_pool_pad_include": (19, [N("AveragePool", ["x"], ["y"], kernel_shape=[3], strides=[1], pads=[2, 1],
                                    count_include_pad=1)], [], (2, 5), False),
    "pad_slice_split": (18, [N("Pad", ["x", "p"], ["q"]), N("Slice", ["q", "s", "e", "ax"], ["c"]),
                             N("Split", ["c"], ["a", "b"], axis=1, num_outputs=2), N("Sub", ["b", "a"], ["y"])],
                        [const("p", np.array([0, 1, 0, 2])), const("s", np.array([1])), const("e", np.array([7])),
                         const("ax", np.array([1]))],
                        (5,), False),
    "scale_div_neg": (17, [N("Mul", ["x", "c"], ["m"]), N("Div", ["m", "d"], ["q"]), N("Neg", ["q"], ["y"])],
                      [const("c", RNG.normal(size=4)), const("d", np.array(-0.5))], (4,), True),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_graphs_against_their_dense_matrix(save, case):
    opset, nodes, inits, in_shape, exact_everywhere = LINEAR_CASES[case]
    named = [helper.make_node(n.op_type, n.input, n.output, name=f"n{i}", domain=n.domain,
                              **{a.name: helper.get_attribute_value(a) for a in n.attribute})
             for i, n in enumerate(nodes)]
    path = save(_shaped(make_model(named, [float_io("x", ["n", *in_shape])], [float_io("y", None)], inits, opset)))
    dense = _dense(path, in_shape)
    for r, bound in _bounds(path).items():
        exact = _op_norm(dense, r)
        assert bound.logits_constant >= exact * (1 - 1e-6), (r, bound.logits_constant, exact)
        if exact_everywhere or r != "2" and case.startswith("avg_pool"):
            assert bound.logits_constant == pytest.approx(exact, rel=1e-5), (r, bound.logits_constant, exact)


def _gelu_erf_slope(x: np.ndarray) -> np.ndarray:
    """d/dx x Phi(x) = Phi(x) + x phi(x)."""
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _gelu_tanh_slope(x: np.ndarray) -> np.ndarray:
    """Derivative of 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)


def _silu_slope(x: np.ndarray) -> np.ndarray:
    """d/dx x sigmoid(x) = s (1 + x (1 - s))."""
    s = 1 / (1 + np.exp(-x))
    return s * (1 + x * (1 - s))


def _max_abs(f, lo: float = -8.0, hi: float = 8.0) -> float:
    """max |f| in float64: a fine grid, then a finer one around the best point."""
    x = np.linspace(lo, hi, 160001)
    best = x[np.argmax(np.abs(f(x)))]
    return float(np.max(np.abs(f(np.linspace(best - 1e-3, best + 1e-3, 20001)))))


def test_activation_constants_cover_the_true_slopes():
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    torch_slopes = {
        "gelu": torch.func.vmap(torch.func.grad(torch.nn.functional.gelu))(x),
        "gelu_tanh": torch.func.vmap(torch.func.grad(lambda v: torch.nn.functional.gelu(v, approximate="tanh")))(x),
        "silu": torch.func.vmap(torch.func.grad(torch.nn.functional.silu))(x),
    }
    for kind, slope in (("gelu", _gelu_erf_slope), ("gelu_tanh", _gelu_tanh_slope), ("silu", _silu_slope)):
        assert np.allclose(slope(x.numpy()), torch_slopes[kind].numpy(), atol=1e-12)  # the right derivative
        true = _max_abs(slope)
        assert true <= ACTIVATION_CONSTANTS[kind] <= true + 2e-5, (kind, true)
    sigmoid = 1 / (1 + np.exp(-np.linspace(-8, 8, 1601)))
    assert np.max(sigmoid * (1 - sigmoid)) <= ACTIVATION_CONSTANTS["sigmoid"]


# ---------------------------------------------------------------- soundness


def _jacobian_norms(module, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Exact operator norms of the per-sample Jacobians (float64)."""
    jac = torch.func.jacrev(lambda v: module(v).sum(0))(x)  # (C, N, *in)
    jac = jac.reshape(jac.shape[0], x.shape[0], -1).transpose(0, 1)  # (N, C, d)
    return torch.tensor([_op_norm(j.detach().numpy(), norm) for j in jac])


def _ascent_ratios(module, x: torch.Tensor, norm: str, steps: int = 20) -> torch.Tensor:
    """||f(x + d) - f(x)|| / ||d|| after gradient ascent on the ratio from random d."""
    d = (0.05 * torch.randn_like(x)).requires_grad_(True)
    optimizer = torch.optim.Adam([d], lr=0.01)
    base = module(x).detach()
    for _ in range(steps):
        ratio = _vec_norm(module(x + d) - base, norm) / _vec_norm(d, norm)
        optimizer.zero_grad()
        (-ratio.log().sum()).backward()
        optimizer.step()
    with torch.no_grad():
        return _vec_norm(module(x + d) - base, norm) / _vec_norm(d, norm)


def _check_sound(converted, bounds: dict[str, GlobalLipschitz], x: torch.Tensor) -> dict[str, float]:
    """Random pairs, ascent pairs and exact Jacobians all stay under each norm's constant."""
    module = converted.logits_module.double()
    x = x.double()
    worst = {}
    for r, bound in bounds.items():
        limit = bound.logits_constant * (1 + 1e-9)
        observed = [_jacobian_norms(module, x, r)]
        with torch.no_grad():
            for scale in (1e-3, 0.1, 1.0, 5.0):
                d = scale * torch.randn_like(x)
                observed.append(_vec_norm(module(x + d) - module(x), r) / _vec_norm(d, r))
        observed.append(_ascent_ratios(module, x, r))
        worst[r] = float(torch.cat(observed).max())
        assert worst[r] <= limit, (r, worst[r], bound.logits_constant)
    return worst


@pytest.mark.parametrize("name", sorted(set(SHIPPED) - {"transformer"}))
def test_shipped_models_are_bounded_soundly(name):
    loaded = load_model(shipped_model(name))
    normalized = normalize_model(loaded.proto)
    bounds = {r: global_lipschitz(normalized, r) for r in NORMS}
    assert all(math.isfinite(b.logits_constant) and b.unbounded_at == () for b in bounds.values())
    data = np.load(shipped_data(name))["x"][:16]
    x = torch.from_numpy(data) + 0.01 * torch.rand(data.shape)  # general position: no MaxPool ties
    _check_sound(convert_model(loaded), bounds, x)
    for r, b in bounds.items():
        assert b.loss_constant("margin") == b.loss_constant("ce") == LOSS_LIP_Z[r] * b.logits_constant


def test_transformer_has_no_global_constant():
    normalized = normalize_model(load_model(shipped_model("transformer")).proto)
    for r in NORMS:
        bound = global_lipschitz(normalized, r)
        assert bound.logits_constant == math.inf and bound.loss_constant("margin") == math.inf
        ops = {op for _, op in bound.unbounded_at}
        assert {"LayerNormalization", "MatMul", "Softmax"} <= ops
        assert bound.to_dict()["logits_constant"] is None


def _random_net(kind: str, rng: np.random.Generator) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """Small nets with random weights exercising several rules at once."""

    def w(*shape: int) -> np.ndarray:
        return rng.normal(scale=0.7, size=shape)

    if kind == "mlp_residual":
        nodes = [N("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
                 N("LeakyRelu", ["h"], ["a"], name="leaky", alpha=-1.7),
                 N("Gemm", ["a", "w2"], ["g"], name="fc2"), N("Add", ["h", "g"], ["s"], name="res"),
                 N("Gelu", ["s"], ["e"], name="gelu", approximate="tanh"),
                 N("Concat", ["e", "s"], ["c"], name="cat", axis=1),
                 N("Gemm", ["c", "w3"], ["y"], name="head", transB=1)]
        inits = [const("w1", w(6, 5)), const("b1", w(6)), const("w2", w(6, 6)), const("w3", w(4, 12))]
        return make_model(nodes, [float_io("x", ["n", 5])], [float_io("y", ["n", 4])], inits, 20), (5,)
    if kind == "cnn_avg":
        nodes = [N("Conv", ["x", "cw", "cb"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                 N("BatchNormalization", ["c", "g", "bb", "mu", "var"], ["bn"], name="bn"),
                 N("PRelu", ["bn", "slope"], ["p"], name="prelu"),
                 N("AveragePool", ["p"], ["ap"], name="avg", kernel_shape=[2, 2], strides=[1, 1]),
                 N("Conv", ["ap", "cw2"], ["c2"], name="conv2", kernel_shape=[2, 2], strides=[2, 2], group=2),
                 N("Tanh", ["c2"], ["t"], name="tanh"),
                 N("Flatten", ["t"], ["f"], name="flat"), N("Gemm", ["f", "w"], ["y"], name="fc", transB=1)]
        inits = [const("cw", w(4, 1, 3, 3)), const("cb", w(4)), const("g", w(4)), const("bb", w(4)),
                 const("mu", w(4)), const("var", rng.uniform(0.3, 2, 4)), const("slope", w(4, 1, 1)),
                 const("cw2", w(4, 2, 2, 2)), const("w", w(3, 16))]
        return make_model(nodes, [float_io("x", ["n", 1, 6, 6])], [float_io("y", ["n", 3])], inits), (1, 6, 6)
    nodes = [N("Conv", ["x", "cw"], ["c"], name="conv", kernel_shape=[2, 2]),
             N("MaxPool", ["c"], ["m"], name="pool", kernel_shape=[2, 2], strides=[1, 1]),
             N("Sigmoid", ["m"], ["s"], name="sig"), N("Mul", ["m", "s"], ["silu"], name="silu"),
             N("GlobalAveragePool", ["silu"], ["gap"], name="gap"), N("Flatten", ["gap"], ["f"], name="flat"),
             N("MatMul", ["f", "w"], ["y"], name="fc")]
    inits = [const("cw", w(3, 2, 2, 2)), const("w", w(3, 5))]
    return make_model(nodes, [float_io("x", ["n", 2, 5, 5])], [float_io("y", ["n", 5])], inits), (2, 5, 5)


@pytest.mark.parametrize("kind,seed", [("mlp_residual", 0), ("mlp_residual", 1), ("cnn_avg", 2), ("pool_silu", 3)])
def test_random_nets_are_bounded_soundly(save, kind, seed):
    rng = np.random.default_rng(seed)
    model, in_shape = _random_net(kind, rng)
    loaded = load_model(save(model))
    bounds = {r: global_lipschitz(normalize_model(loaded.proto), r) for r in NORMS}
    assert all(math.isfinite(b.logits_constant) and b.unbounded_at == () for b in bounds.values())
    x = torch.from_numpy(rng.normal(size=(16, *in_shape)))
    worst = _check_sound(convert_model(loaded), bounds, x)
    assert all(v > 0 for v in worst.values())
    if kind == "mlp_residual":
        assert bounds["inf"].per_node["leaky"] == pytest.approx(1.7)


# ---------------------------------------------------------------- unbounded and usage


def test_unknown_op_gives_inf_with_the_node(save):
    nodes = [N("Gemm", ["x", "w"], ["h"], name="fc", transB=1), N("Sin", ["h"], ["s"], name="wave"),
             N("Gemm", ["s", "w2"], ["y"], name="head", transB=1)]
    model = make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 2])],
                       [const("w", RNG.normal(size=(3, 3))), const("w2", RNG.normal(size=(2, 3)))])
    for bound in _bounds(save(model)).values():
        assert bound.logits_constant == math.inf and bound.unbounded_at == (("wave", "Sin"),)
        assert math.isfinite(bound.per_node["head"])


def test_foreign_domain_and_variable_products_never_raise():
    nodes = [N("Foo", ["x"], ["f"], name="custom", domain="com.example"),
             N("Mul", ["x", "x"], ["sq"], name="square"), N("Div", ["x", "sq"], ["q"], name="ratio"),
             N("Add", ["f", "q"], ["y"], name="sum")]
    model = make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 3])],
                       extra_opsets=[("com.example", 1)])
    normalized = NormalizedModel(proto=model, input_name="x", output_names=("y",), logits_index=0)
    bound = global_lipschitz(normalized, "inf")
    assert bound.logits_constant == math.inf
    assert bound.unbounded_at == (("custom", "com.example.Foo"), ("square", "Mul"), ("ratio", "Div"))
    # in l2 the final Add cannot rule out a broadcast either: Foo's output shape is unknown
    assert global_lipschitz(normalized, "2").unbounded_at[-1] == ("sum", "Add")


def test_norm_and_loss_validation(save):
    normalized = normalize_model(load_model(save(_gemm_model(RNG.normal(size=(2, 2))))).proto)
    with pytest.raises(UsageError, match="threat norm"):
        global_lipschitz(normalized, "3")
    bound = global_lipschitz(normalized, "inf")
    assert bound.loss_constant("margin") == 2 * bound.logits_constant
    assert global_lipschitz(normalized, "2").loss_constant("ce") == pytest.approx(
        math.sqrt(2) * global_lipschitz(normalized, "2").logits_constant)
    assert bound.loss_constant("zero_one") == math.inf
    with pytest.raises(UsageError, match="unknown loss"):
        bound.loss_constant("hinge")
    assert bound.to_dict()["norm"] == "inf"
