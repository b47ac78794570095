"""Conversion to torch agrees with onnxruntime: one-node graphs, hand-built nets, shipped models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SHIPPED, const, float_io, make_model, shipped_data, shipped_model
from onnx import TensorProto, helper

from verifier import errors
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

N = helper.make_node
RNG = np.random.default_rng(0)


def _check_against_ort(path, x: np.ndarray, atol: float = 1e-5):
    loaded = load_model(path)
    converted = convert_model(loaded)
    report = validate_against_onnxruntime(loaded, converted, x.astype(np.float32), atol=atol, rtol=atol)
    assert report.passed, report.to_dict()
    assert report.top1_agreement == 1.0
    return converted, report


ONE_NODE_CASES = {
    "reshape_allowzero": (19, [N("Reshape", ["x", "shape"], ["y"], allowzero=1)], [const("shape", np.array([2, -1]))],
                          [2, 3, 4], [2, 12]),
    "reshape_zero_copies_dim": (14, [N("Reshape", ["x", "shape"], ["y"])], [const("shape", np.array([0, -1]))],
                                [2, 3, 4], [2, 12]),
    "slice_negative_step": (13, [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
                            [const("st", np.array([-1])), const("en", np.array([-1000])), const("ax", np.array([1])),
                             const("sp", np.array([-2]))], [2, 5], [2, 3]),
    "slice_two_axes": (18, [N("Slice", ["x", "st", "en", "ax"], ["y"])],
                       [const("st", np.array([1, 0])), const("en", np.array([3, 2])), const("ax", np.array([-1, 1]))],
                       [2, 3, 4], [2, 2, 2]),
    "split18_num_outputs": (18, [N("Split", ["x"], ["a", "b"], axis=1, num_outputs=2), N("Sub", ["a", "b"], ["y"])],
                            [], [2, 6], [2, 3]),
    "split18_sizes": (18, [N("Split", ["x", "sz"], ["a", "b"], axis=1), N("Concat", ["b", "a"], ["y"], axis=1)],
                      [const("sz", np.array([2, 4]))], [2, 6], [2, 6]),
    "reduce_mean18": (18, [N("ReduceMean", ["x", "ax"], ["y"], keepdims=0)], [const("ax", np.array([1]))],
                      [2, 5], [2]),
    "reduce_max20": (20, [N("ReduceMax", ["x", "ax"], ["y"], keepdims=1)], [const("ax", np.array([-1]))],
                     [2, 5], [2, 1]),
    "reduce_l2_all": (18, [N("ReduceL2", ["x"], ["y"], keepdims=0)], [], [2, 5], []),
    "gelu20_tanh": (20, [N("Gelu", ["x"], ["y"], approximate="tanh")], [], [2, 5], [2, 5]),
    "pad19": (19, [N("Pad", ["x", "p"], ["y"])], [const("p", np.array([0, 1, 0, 2]))], [2, 3], [2, 6]),
    "identity21_flatten21": (21, [N("Identity", ["x"], ["i"]), N("Flatten", ["i"], ["y"])], [], [2, 3, 2], [2, 6]),
    "averagepool19": (19, [N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2])], [], [1, 1, 4, 4], [1, 1, 3, 3]),
}


@pytest.mark.parametrize("case", sorted(ONE_NODE_CASES))
def test_one_node_graphs_match_onnxruntime(case, save):
    opset, nodes, inits, in_shape, out_shape = ONE_NODE_CASES[case]
    model = make_model(nodes, [float_io("x", in_shape)], [float_io("y", out_shape)], inits, opset)
    _check_against_ort(save(model), RNG.normal(size=in_shape))


def _cnn_graph():
    nodes = [N("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             N("BatchNormalization", ["c", "g", "bb", "mu", "var"], ["bn"], name="bn"),
             N("Relu", ["bn"], ["r"], name="relu"),
             N("MaxPool", ["r"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             N("Flatten", ["mp"], ["f"], name="flat"),
             N("Gemm", ["f", "w", "b"], ["h"], name="fc", transB=1),
             N("Sigmoid", ["h"], ["s"], name="sig"), N("Mul", ["s", "h"], ["a"], name="silu"),
             N("MatMul", ["a", "w2"], ["m"], name="fc2"), N("Add", ["m", "b2"], ["logits"], name="bias2"),
             N("Softmax", ["logits"], ["probs"], name="softmax", axis=1)]
    inits = [const("cw", RNG.normal(size=(2, 1, 3, 3))), const("cb", RNG.normal(size=2)),
             const("g", RNG.uniform(0.5, 2, size=2)), const("bb", RNG.normal(size=2)),
             const("mu", RNG.normal(size=2)), const("var", RNG.uniform(0.5, 2, size=2)),
             const("w", RNG.normal(size=(6, 32))), const("b", RNG.normal(size=6)),
             const("w2", RNG.normal(size=(6, 4))), const("b2", RNG.normal(size=4))]
    return make_model(nodes, [float_io("x", ["n", 1, 8, 8])], [float_io("probs", ["n", 4])], inits)


def test_hand_built_cnn_converts_with_logits_and_probes(save):
    converted, report = _check_against_ort(save(_cnn_graph()), RNG.uniform(size=(9, 1, 8, 8)))
    assert converted.output_names == ("probs", "logits")
    assert [o.name for o in report.outputs] == ["probs", "logits"]
    assert [s.kind for s in converted.sites] == ["relu", "max_pool", "silu", "softmax"]
    x = torch.rand(5, 1, 8, 8)
    logits, probes = converted.probe_module()(x)
    assert torch.allclose(logits, converted.logits(x))
    relu_pre, relu_post = probes[0]
    assert torch.equal(relu_post, torch.relu(relu_pre))
    silu_pre, silu_post = probes[2]
    assert torch.allclose(silu_post, torch.nn.functional.silu(silu_pre), atol=1e-6)
    pool_pre, pool_post = probes[1]
    assert torch.equal(pool_post, torch.nn.functional.max_pool2d(pool_pre, 2))
    assert set(converted.probe_module([2])(x)[1]) == {2}


def test_unsupported_ops_are_all_listed(save):
    nodes = [N("Hardmax", ["x"], ["h"], name="first_bad"), N("Relu", ["h"], ["r"], name="fine"),
             N("Det", ["r"], ["y"], name="second_bad")]
    model = make_model(nodes, [float_io("x", [3, 3])], [float_io("y", [])])
    with pytest.raises(errors.UnsupportedOpsError) as caught:
        convert_model(load_model(save(model)))
    message = str(caught.value)
    assert "Hardmax (opset 17) at node 'first_bad'" in message and "Det" in message and "second_bad" in message
    assert "fine" not in message
    assert len(caught.value.nodes) == 2


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models_match_onnxruntime(name):
    loaded = load_model(shipped_model(name))
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=200)
    converted, report = _check_against_ort(shipped_model(name), samples.x)
    assert report.samples == 200
    logits = converted.logits(torch.from_numpy(samples.x))
    accuracy = float((logits.argmax(1).numpy() == samples.y).mean())
    assert accuracy > 0.85  # trained models, see models/README.md


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_probes_give_activation_values(name):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=16)
    x = torch.from_numpy(samples.x)
    logits, probes = converted.probe_module()(x)
    assert torch.allclose(logits, converted.logits(x), atol=1e-6)
    functions = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
                 "max_pool": lambda t: torch.nn.functional.max_pool2d(t, 2),
                 "softmax": lambda t: torch.softmax(t, dim=-1)}
    assert len(probes) == len(converted.sites) > 0
    for site in converted.sites:
        pre, post = probes[site.index]
        assert torch.allclose(post, functions[site.kind](pre), atol=1e-5), site


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_batched_jacobians_through_vmap(name):
    """Baked Reshape/Slice keep the logits module traceable by torch.func.vmap(jacrev)."""
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=3)
    # Digit images have flat regions that tie MaxPool windows: move to points in general position.
    x = torch.from_numpy(samples.x).double() + 0.01 * torch.rand(samples.x.shape, dtype=torch.float64)
    module = converted.logits_module.double()
    jac = torch.func.vmap(torch.func.jacrev(lambda v: module(v.unsqueeze(0)).squeeze(0)))(x)
    step = 1e-6
    direction = torch.randn_like(x)
    finite = (module(x + step * direction) - module(x - step * direction)) / (2 * step)
    predicted = torch.einsum("nc...,n...->nc", jac, direction)
    assert torch.allclose(predicted, finite, atol=1e-5)


def test_skl2onnx_mlp_classifier(tmp_path):
    """skl2onnx's default export (ZipMap, labels, opset 21) converts and validates."""
    sklearn = pytest.importorskip("sklearn")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    classifier = MLPClassifier(hidden_layer_sizes=(24,), max_iter=60, random_state=0).fit(x[:1000], y[:1000])
    path = tmp_path / "skl.onnx"
    path.write_bytes(skl2onnx.to_onnx(classifier, x[:1]).SerializeToString())
    converted, report = _check_against_ort(path, x[1000:1300])
    assert [s.kind for s in converted.sites] == ["relu", "softmax"]
    logits = converted.logits(torch.from_numpy(x[1000:1300])).detach().numpy()
    assert np.array_equal(logits.argmax(1), classifier.predict(x[1000:1300]))
    expected = classifier.predict_proba(x[1000:1300])
    probs = converted.outputs(torch.from_numpy(x[1000:1300]))[0].detach().numpy()
    assert np.allclose(probs, expected, atol=1e-5)
    assert sklearn.__version__


def test_fixed_batch_export_is_chunked(tmp_path):
    """A model exported with a fixed batch of 1 validates sample by sample."""
    import digits_models

    module = digits_models.build("mlp_relu").eval()
    path = tmp_path / "fixed.onnx"
    digits_models.export_onnx(module, "mlp_relu", path, opset=18, dynamo=False, batch=1)
    loaded = load_model(path)
    assert loaded.info.data_input.shape == (1, 64)
    _check_against_ort(path, RNG.uniform(size=(7, 64)))


def test_converted_module_is_in_eval_mode():
    converted = convert_model(load_model(shipped_model("cnn")))
    assert not converted.module.training
    x = torch.rand(4, 1, 8, 8)
    before = converted.logits(x)
    converted.logits(torch.rand(64, 1, 8, 8) * 10)
    assert torch.equal(before, converted.logits(x))  # no batch statistics, no running-stat updates
    assert np.isfinite(before.detach().numpy()).all()


def test_non_tensor_outputs_only_is_refused(save):
    nodes = [N("ArgMax", ["x"], ["y"], axis=1)]
    model = make_model(nodes, [float_io("x", [2, 3])], [("y", TensorProto.INT64, [2, 1])])
    with pytest.raises(errors.UnsupportedOpsError, match="no floating-point output"):
        convert_model(load_model(save(model)))


def _mlp(names, opset: int = 17):
    """x -> MatMul -> Add -> Relu -> MatMul -> y, with the given node names."""
    nodes = [N("MatMul", ["x", "w1"], ["m"], name=names[0]), N("Add", ["m", "b1"], ["h"], name=names[1]),
             N("Relu", ["h"], ["r"], name=names[2]), N("MatMul", ["r", "w2"], ["y"], name=names[3])]
    inits = [const("w1", RNG.normal(size=(4, 5))), const("b1", RNG.normal(size=5)), const("w2", RNG.normal(size=(5, 3)))]
    return make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 3])], inits, opset)


NASTY_NAMES = ["self", "code", "class", "def", "None", "True", "lambda", "to", "float", "cuda", "type", "training",
               "forward", "eval", "__init__", "_modules", "graph", "initializers"]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_node_names_that_are_python_or_module_words(name, save):
    for position in (0, 2, 3):
        names = ["a", "b", "c", "d"]
        names[position] = name
        converted, _ = _check_against_ort(save(_mlp(names)), RNG.normal(size=(6, 4)))
        (site,) = converted.sites
        assert converted.display_name(site.nodes[0]) == names[2]


def test_messages_name_nodes_as_inspect_does(save):
    nodes = [N("Relu", ["x"], ["h"], name="class"), N("Hardmax", ["h"], ["y"])]
    model = make_model(nodes, [float_io("x", [2, 3])], [float_io("y", [2, 3])])
    with pytest.raises(errors.UnsupportedOpsError, match="Hardmax \\(opset 17\\) at node 'Hardmax_1'"):
        convert_model(load_model(save(model)))


REDUCE_NOOP = ["ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum"]


@pytest.mark.parametrize("op", REDUCE_NOOP)
def test_reduce18_noop_with_empty_axes_keeps_the_elementwise_part(op, save):
    model = make_model([N(op, ["x"], ["y"], noop_with_empty_axes=1)], [float_io("x", ["n", 3])],
                       [float_io("y", ["n", 3])], opset=18)
    x = RNG.uniform(0.1, 2.0, size=(5, 3)) * np.where(RNG.uniform(size=(5, 3)) < 0.5, -1, 1)
    if op == "ReduceLogSum":
        x = np.abs(x)
    _check_against_ort(save(model), x)


def test_split18_num_outputs_with_an_empty_last_piece(save):
    nodes = [N("Split", ["x"], ["a", "b", "c", "d"], axis=1, num_outputs=4), N("Concat", ["d", "c", "b", "a"], ["y"],
                                                                                axis=1)]
    model = make_model(nodes, [float_io("x", ["n", 6])], [float_io("y", ["n", 6])], opset=18)
    _check_against_ort(save(model), RNG.normal(size=(3, 6)))


@pytest.mark.parametrize("inputs", [["h", "", "hi"], ["h"], ["h", "ninf", "hi"]])
def test_clip_with_missing_bounds_converts(inputs, save):
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("Clip", inputs, ["y"])]
    inits = [const("w", RNG.normal(size=(4, 3))), const("lo", -0.2), const("hi", 0.5), const("ninf", -np.inf)]
    model = make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 3])], inits, opset=18)
    converted, _ = _check_against_ort(save(model), RNG.normal(size=(6, 4)))
    expected = {"max": 0.5} if "hi" in inputs else None
    assert [s.params for s in converted.sites] == ([] if expected is None else [pytest.approx(expected)])


def test_torch_clamp_max_export_converts(tmp_path):
    """Both torch exporters write clamp(max=...) as Clip(x, "", max)."""
    class Clamped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x).clamp(max=0.1)

    path = tmp_path / "clamp.onnx"
    torch.onnx.export(Clamped().eval(), (torch.randn(2, 4),), str(path), dynamo=False, opset_version=18,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    converted, _ = _check_against_ort(path, RNG.normal(size=(5, 4)))
    assert [(s.kind, s.params) for s in converted.sites] == [("clip", {"max": pytest.approx(0.1)})]


def test_probes_when_the_input_is_also_an_output(save):
    model = make_model([N("Relu", ["x"], ["y"], name="r")], [float_io("x", ["n", 3])],
                       [float_io("y", ["n", 3]), float_io("x", ["n", 3])])
    converted, _ = _check_against_ort(save(model), RNG.normal(size=(4, 3)))
    x = torch.randn(2, 3)
    logits, probes = converted.probe_module()(x)
    pre, post = probes[0]
    assert torch.equal(pre, x) and torch.equal(post, torch.relu(x)) and torch.equal(logits, post)


def test_slice_with_attributes_is_reported_not_crashed(save):
    model = make_model([N("Slice", ["x"], ["y"], starts=[1], ends=[100], axes=[1], name="cut")],
                       [float_io("x", [2, 7])], [float_io("y", [2, 6])], opset=9)
    with pytest.raises(errors.UnsupportedOpsError, match="Slice \\(opset 9\\) at node 'cut' \\(no converter\\)"):
        convert_model(load_model(save(model)))


def _scalar_sum_model(batch):
    return make_model([N("ReduceSum", ["x"], ["y"], keepdims=0)], [float_io("x", [batch, 4])], [float_io("y", [])],
                      opset=13)


@pytest.mark.parametrize("batch,samples", [(1, 3), ("n", 300)])
def test_validate_scalar_output_over_several_chunks(batch, samples, save):
    path = save(_scalar_sum_model(batch))
    loaded = load_model(path)
    report = validate_against_onnxruntime(loaded, convert_model(loaded), RNG.uniform(size=(samples, 4)).astype(
        np.float32), atol=1e-4, rtol=1e-4)
    assert report.passed


def test_validate_zero_size_output(save):
    model = make_model([N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], [float_io("x", ["n", 7])],
                       [float_io("y", ["n", 0])], [const("st", np.array([3])), const("en", np.array([3])),
                                                   const("ax", np.array([1])), const("sp", np.array([-1]))])
    loaded = load_model(save(model))
    report = validate_against_onnxruntime(loaded, convert_model(loaded), RNG.normal(size=(4, 7)).astype(np.float32))
    assert report.passed and report.max_abs_diff == 0.0
    assert report.top1_agreement is None and report.to_dict()["top1_agreement"] is None


def test_validate_identical_nans_agree(save):
    model = make_model([N("Sqrt", ["x"], ["y"])], [float_io("x", ["n", 4])], [float_io("y", ["n", 4])])
    loaded = load_model(save(model))
    report = validate_against_onnxruntime(loaded, convert_model(loaded), RNG.normal(size=(8, 4)).astype(np.float32))
    assert report.passed and report.max_abs_diff == 0.0


def test_validate_nan_on_one_side_is_an_infinite_difference(save, monkeypatch):
    model = make_model([N("Relu", ["x"], ["y"])], [float_io("x", ["n", 4])], [float_io("y", ["n", 4])])
    loaded = load_model(save(model))
    converted = convert_model(loaded)
    monkeypatch.setattr(converted.module, "forward", lambda x: torch.full_like(x, float("nan")))
    report = validate_against_onnxruntime(loaded, converted, RNG.normal(size=(3, 4)).astype(np.float32))
    assert not report.passed and report.max_abs_diff == math.inf
    assert report.to_dict()["max_abs_diff"] == "Infinity"


def test_onnxruntime_failure_is_a_verifier_error_with_a_batch_hint(save):
    model = make_model([N("Reshape", ["x", "s"], ["y"])], [float_io("x", ["n", 4, 5])], [float_io("y", [1, 20])],
                       [const("s", np.array([1, 20]))])
    loaded = load_model(save(model))
    with pytest.raises(errors.RuntimeRunError, match="onnxruntime cannot run the model.*hard-code its batch"):
        validate_against_onnxruntime(loaded, convert_model(loaded), RNG.normal(size=(4, 4, 5)).astype(np.float32))


def test_onnxruntime_refusing_the_model_is_a_verifier_error(save):
    model = _mlp(["a", "a", "b", "c"])
    loaded = load_model(save(model))
    with pytest.raises(errors.RuntimeRunError, match="onnxruntime cannot run the model.*same node name"):
        validate_against_onnxruntime(loaded, convert_model(loaded), RNG.normal(size=(4, 4)).astype(np.float32))


def test_torch_failure_is_a_verifier_error(save, monkeypatch):
    loaded = load_model(save(_mlp(["a", "b", "c", "d"])))
    converted = convert_model(loaded)

    def broken(x):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(converted.module, "forward", broken)
    with pytest.raises(errors.RuntimeRunError, match="torch .*cannot run the model.*shape mismatch"):
        validate_against_onnxruntime(loaded, converted, RNG.normal(size=(4, 4)).astype(np.float32))
