"""Models exported with a fixed batch are analysed like their dynamic-batch twins (issue 10, item 4).

Each case is built twice from the same numpy weights, once with a fixed batch and once with a
dynamic one; the fixed one must be rewritten to a dynamic batch (checked in onnxruntime) and give
the same certificate and attack risks, or, when samples interact across the batch axis, keep its
fixed batch and still agree with onnxruntime sample by sample.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import const, float_io, make_model
from onnx import helper, numpy_helper

from verifier.attacks import attack
from verifier.bounds.network import BoundNetwork
from verifier.certify.certificate import certify
from verifier.cli import main
from verifier.convert import convert_model
from verifier.convert.batch import make_batch_dynamic
from verifier.jacobian import logits_jacobian
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

N = helper.make_node
RNG = np.random.default_rng(7)


def _weights(*shape: int) -> np.ndarray:
    return RNG.normal(scale=0.5, size=shape).astype(np.float32)


MLP = {"W1": _weights(8, 6), "b1": _weights(8), "W2": _weights(3, 8), "b2": _weights(3)}
CNN = {"K": _weights(2, 1, 3, 3), "c": _weights(2), "W": _weights(3, 32), "b": _weights(3)}
RESHAPE = {"W1": _weights(16, 4, 4).reshape(16, 16), "b1": _weights(16), "W2": _weights(3, 16), "b2": _weights(3)}


def mlp(batch) -> object:
    """x (B, 6) -> Gemm -> Relu -> Gemm -> logits (B, 3)."""
    nodes = [N("Gemm", ["x", "W1", "b1"], ["h"], transB=1), N("Relu", ["h"], ["r"]),
             N("Gemm", ["r", "W2", "b2"], ["logits"], transB=1)]
    return make_model(nodes, [float_io("x", [batch, 6])], [float_io("logits", [batch, 3])],
                      [const(k, v) for k, v in MLP.items()])


def cnn(batch) -> object:
    """x (B, 1, 6, 6) -> Conv 3x3 -> Relu -> Reshape([B, -1]) -> Gemm -> logits (B, 3)."""
    first = batch if isinstance(batch, int) else -1
    flat = [first, -1] if isinstance(batch, int) else [-1, 32]
    nodes = [N("Conv", ["x", "K", "c"], ["conv"], kernel_shape=[3, 3]), N("Relu", ["conv"], ["r"]),
             N("Reshape", ["r", "flat"], ["f"]), N("Gemm", ["f", "W", "b"], ["logits"], transB=1)]
    return make_model(nodes, [float_io("x", [batch, 1, 6, 6])], [float_io("logits", [batch, 3])],
                      [const(k, v) for k, v in CNN.items()] + [const("flat", np.array(flat, dtype=np.int64))])


def reshaped(batch) -> object:
    """x (B, 4, 4) -> Reshape([B, 16]) in a Constant node -> Gemm -> Relu -> Gemm -> logits (B, 3)."""
    shape = np.array([batch if isinstance(batch, int) else -1, 16], dtype=np.int64)
    nodes = [N("Constant", [], ["shape"], value=helper.make_tensor("shape", 7, [2], shape)),
             N("Reshape", ["x", "shape"], ["f"]), N("Gemm", ["f", "W1", "b1"], ["h"], transB=1),
             N("Relu", ["h"], ["r"]), N("Gemm", ["r", "W2", "b2"], ["logits"], transB=1)]
    return make_model(nodes, [float_io("x", [batch, 4, 4])], [float_io("logits", [batch, 3])],
                      [const(k, v) for k, v in RESHAPE.items()])


CASES = {"mlp": (mlp, (6,)), "cnn": (cnn, (1, 6, 6)), "reshape": (reshaped, (4, 4))}


def _data(shape: tuple[int, ...], count: int, path) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(3).random((count, *shape)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(count)]).argmax(1)
    y[::3] = (y[::3] + 1) % 3  # a few misclassified samples: the certificate is not all zeros
    return x, y


def _ort_one_by_one(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_batch_one_is_rewritten_and_matches_dynamic_twin(case, save, one_thread):
    build, shape = CASES[case]
    fixed_path, dynamic_path = save(build(1), "fixed.onnx"), save(build("n"), "dynamic.onnx")
    fixed_loaded, dynamic_loaded = load_model(fixed_path), load_model(dynamic_path)
    fixed, dynamic = convert_model(fixed_loaded), convert_model(dynamic_loaded)
    assert fixed_loaded.info.data_input.shape[0] == 1
    assert fixed.batch.rewritten and fixed.module_batch is None and fixed.batch.fixed == 1
    assert dynamic.batch.fixed is None and not dynamic.batch.rewritten
    x, y = _data(shape, 7, fixed_path)

    # the rewritten module takes a batch of 7 and agrees with onnxruntime run sample by sample
    reference = _ort_one_by_one(fixed_path, x)
    assert np.abs(fixed.logits(torch.from_numpy(x)).detach().numpy() - reference).max() <= 1e-5
    report = validate_against_onnxruntime(fixed_loaded, fixed, x, device="cpu")
    assert report.passed and report.samples == 7 and report.max_abs_diff <= 1e-5

    # bounds are built (no refusal) and reproduce the logits
    network = BoundNetwork.from_model(fixed)
    values = network.evaluate(torch.from_numpy(x).double())
    assert np.abs(values.numpy() - reference).max() <= 1e-5

    kwargs = dict(deltas=[0.02, 0.1], p=2, norm="inf", loss="ce", box=(0.0, 1.0))
    got, want = certify(fixed, x, y, **kwargs), certify(dynamic, x, y, **kwargs)
    assert not any("fixed batch" in f for f in got.fallbacks)
    assert got.fallbacks == want.fallbacks
    for a, b in zip(got.results, want.results):
        assert a.certificate == pytest.approx(b.certificate, rel=1e-9, abs=1e-12)
        assert a.clean_risk == pytest.approx(b.clean_risk, rel=1e-9)
        assert a.certificate >= a.clean_risk

    risks = [attack(m, loaded, x, y, ["pgd"], [0.1], p=2.0, norm="inf", loss="ce", box=(0.0, 1.0), steps=5)
             for m, loaded in ((fixed, fixed_loaded), (dynamic, dynamic_loaded))]
    assert risks[0].results[0].risk == pytest.approx(risks[1].results[0].risk, rel=1e-9)
    assert risks[0].results[0].replayed_in_onnxruntime
    assert risks[0].results[0].risk <= got.results[1].certificate + 1e-9


def test_cli_inspect_and_validate_say_the_batch_was_rewritten(save, capsys):
    path = save(cnn(1), "fixed.onnx")
    assert main(["inspect", str(path)]) == 0
    assert "fixed batch 1 rewritten to dynamic (checked in onnxruntime)" in capsys.readouterr().out
    assert main(["validate", str(path), "--samples", "5"]) == 0
    out = capsys.readouterr().out
    assert "fixed batch 1 rewritten to dynamic (checked in onnxruntime)" in out and "PASS" in out


def _mixing_model(batch: int = 4) -> object:
    """x (B, 3) -> x - ReduceMean(x, axis 0) -> Gemm: every sample depends on the whole batch."""
    nodes = [N("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1), N("Sub", ["x", "mean"], ["c"]),
             N("Gemm", ["c", "W", "b"], ["logits"], transB=1)]
    weight, bias = _weights(2, 3), _weights(2)
    return make_model(nodes, [float_io("x", [batch, 3])], [float_io("logits", [batch, 2])],
                      [const("W", weight), const("b", bias)]), weight, bias


def test_batch_one_mean_over_the_batch_runs_sample_by_sample(save):
    """B = 1: x - mean over the batch is 0 for one sample, so the logits are the bias; a dynamic
    batch would change that, the check sees it and every sample runs alone."""
    proto, _, bias = _mixing_model(1)
    loaded = load_model(save(proto, "mean1.onnx"))
    converted = convert_model(loaded)
    assert converted.module_batch == 1 and "samples interact" in converted.batch.reason
    assert converted.batch.describe().endswith("samples run one sample after another")
    x = np.random.default_rng(8).random((5, 3)).astype(np.float32)
    assert validate_against_onnxruntime(loaded, converted, x, device="cpu").passed
    result = logits_jacobian(converted, x, device="cpu", dtype=torch.float64)
    assert np.abs(result.logits.numpy() - bias).max() <= 1e-6
    assert result.jacobian.abs().max() <= 1e-12  # the logits do not depend on the sample


def test_model_that_mixes_samples_keeps_its_fixed_batch(save):
    proto, weight, bias = _mixing_model()
    path = save(proto, "mixing.onnx")
    loaded = load_model(path)
    converted = convert_model(loaded)
    assert converted.batch.fixed == 4 and not converted.batch.rewritten and converted.module_batch == 4
    assert "samples interact" in converted.batch.reason
    assert "fixed batch 4 kept" in converted.batch.describe()
    x = np.random.default_rng(5).random((10, 3)).astype(np.float32)  # not a multiple of 4: padded
    report = validate_against_onnxruntime(loaded, converted, x, device="cpu")
    assert report.passed and report.samples == 10
    # closed form: chunks of 4, the last one padded with copies of sample 9
    chunks = [x[0:4], x[4:8], np.concatenate([x[8:10], x[9:10], x[9:10]])]
    expected = np.concatenate([(c - c.mean(0)) @ weight.T + bias for c in chunks])[:10]
    torch_logits = logits_jacobian(converted, x, device="cpu", dtype=torch.float64)
    assert np.abs(torch_logits.logits.numpy() - expected).max() <= 1e-5
    with pytest.raises(Exception, match="fixed batch of 4"):
        BoundNetwork.from_model(converted)


def test_batch_folded_into_features_is_not_rewritten(save):
    """A batch-4 input reshaped to (2, 24), through a Gemm and back to (4, 3): pairs of samples are
    folded together, the rewritten graph cannot run 9 samples, so the fixed batch stays and
    validation, sample chunks of 4, still passes."""
    weight, bias = _weights(6, 24), _weights(3)
    nodes = [N("Reshape", ["x", "shape"], ["f"]), N("Gemm", ["f", "W", "b"], ["g"], transB=1),
             N("Reshape", ["g", "back"], ["h"]), N("Add", ["h", "c"], ["logits"])]
    proto = make_model(nodes, [float_io("x", [4, 12])], [float_io("logits", [4, 3])],
                       [const("shape", np.array([2, 24], dtype=np.int64)), const("W", weight),
                        const("b", np.zeros(6, np.float32)), const("back", np.array([4, 3], dtype=np.int64)),
                        const("c", bias)])
    loaded = load_model(save(proto, "folded.onnx"))
    converted = convert_model(loaded)
    assert converted.batch.fixed == 4 and not converted.batch.rewritten
    assert "cannot run the rewritten graph on 9 samples" in converted.batch.reason
    x = np.random.default_rng(2).random((8, 12)).astype(np.float32)
    report = validate_against_onnxruntime(loaded, converted, x, device="cpu")
    assert report.passed and report.samples == 8
    expected = np.concatenate([(x[i:i + 4].reshape(2, 24) @ weight.T).reshape(4, 3) + bias for i in (0, 4)])
    got = np.concatenate([converted.logits(torch.from_numpy(x[i:i + 4])).detach().numpy() for i in (0, 4)])
    assert np.abs(got - expected).max() <= 1e-5


def _bias_rows(batch) -> object:
    """x (B, 6) -> Gemm -> Add(a constant bias written out once per row) -> logits (B, 3); with a
    fixed batch of 2 the (2, 3) bias does not broadcast to other batch sizes."""
    bias = np.array([0.3, -0.2, 0.1], dtype=np.float32)
    rows = np.tile(bias, (batch, 1)) if isinstance(batch, int) else bias
    nodes = [N("Gemm", ["x", "W1", "b1"], ["h"], transB=1), N("Relu", ["h"], ["r"]),
             N("Gemm", ["r", "W2", "b2"], ["z"], transB=1), N("Add", ["z", "rows"], ["logits"])]
    return make_model(nodes, [float_io("x", [batch, 6])], [float_io("logits", [batch, 3])],
                      [const(k, v) for k, v in MLP.items()] + [const("rows", rows)])


def test_fallback_runs_chunks_of_the_fixed_batch_and_pads_the_last(save, one_thread):
    """B = 2, 5 samples, not rewritable (a (2, 3) constant): Jacobians, attacks and the certificate
    run the module two samples at a time, the last chunk padded; they match the dynamic twin
    (the certificate is only sound, not equal: bounds need a dynamic batch)."""
    fixed_path, dynamic_path = save(_bias_rows(2), "fixed.onnx"), save(_bias_rows("n"), "dynamic.onnx")
    fixed_loaded, dynamic_loaded = load_model(fixed_path), load_model(dynamic_path)
    fixed, dynamic = convert_model(fixed_loaded), convert_model(dynamic_loaded)
    assert fixed.module_batch == 2 and not fixed.batch.rewritten
    x = np.random.default_rng(4).random((5, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1])
    assert validate_against_onnxruntime(fixed_loaded, fixed, x, device="cpu").passed
    got = logits_jacobian(fixed, x, device="cpu", dtype=torch.float64)
    want = logits_jacobian(dynamic, x, device="cpu", dtype=torch.float64)
    assert got.jacobian.shape == (5, 3, 6)
    assert torch.allclose(got.jacobian, want.jacobian, atol=1e-12)
    assert torch.allclose(got.logits, want.logits, atol=1e-6)
    risks = [attack(m, loaded, x, y, ["pgd"], [0.1], p=2.0, norm="inf", loss="ce", box=(0.0, 1.0), steps=5)
             for m, loaded in ((fixed, fixed_loaded), (dynamic, dynamic_loaded))]
    assert risks[0].results[0].risk == pytest.approx(risks[1].results[0].risk, rel=1e-6)
    kwargs = dict(deltas=[0.05], p=2, norm="inf", loss="ce", box=(0.0, 1.0))
    kept, twin = certify(fixed, x, y, **kwargs), certify(dynamic, x, y, **kwargs)
    assert any("fixed batch of 2 kept" in f for f in kept.fallbacks)
    assert kept.results[0].clean_risk == pytest.approx(twin.results[0].clean_risk, rel=1e-6)
    assert kept.results[0].certificate >= twin.results[0].certificate - 1e-9
    assert kept.results[0].certificate >= risks[0].results[0].risk - 1e-9


def test_rewrite_check_rejects_a_wrong_rewrite(save):
    """The onnxruntime check compares against the reference graph: a reference that differs is caught."""
    model, other = mlp(1), mlp(1)
    other.graph.initializer[1].CopyFrom(const("b1", MLP["b1"] + 1.0))
    _, axis = make_batch_dynamic(model, other, "x")
    assert not axis.rewritten and "differs" in axis.reason
    rewritten, axis = make_batch_dynamic(model, model, "x")
    assert axis.rewritten
    assert rewritten.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_fixed_batch_two_with_odd_sample_count_is_padded(save):
    """B = 2 with 5 samples: the rewritten module and, for the oracle, chunks of 2 (last one padded)."""
    path = save(mlp(2), "fixed2.onnx")
    loaded = load_model(path)
    converted = convert_model(loaded)
    assert converted.batch.rewritten and converted.batch.fixed == 2
    x = np.random.default_rng(1).random((5, 6)).astype(np.float32)
    report = validate_against_onnxruntime(loaded, converted, x, device="cpu")
    assert report.passed and report.samples == 5
    hidden = np.maximum(x @ MLP["W1"].T + MLP["b1"], 0)
    expected = hidden @ MLP["W2"].T + MLP["b2"]
    assert np.abs(converted.logits(torch.from_numpy(x)).detach().numpy() - expected).max() <= 1e-5


def test_expand_and_allowzero_reshape_are_rewritten(save):
    """B = 2: Expand([2, 3, 6]) becomes Expand([1, 3, 6]) and Reshape([2, 18], allowzero=1) becomes
    Reshape([-1, 18]); the rewritten module runs 5 samples and matches the closed form."""
    weight = _weights(3, 18)
    nodes = [N("Expand", ["x", "wide"], ["e"]), N("Reshape", ["e", "flat"], ["f"], allowzero=1),
             N("Gemm", ["f", "W", "b"], ["logits"], transB=1)]
    proto = make_model(nodes, [float_io("x", [2, 1, 6])], [float_io("logits", [2, 3])],
                       [const("wide", np.array([2, 3, 6], dtype=np.int64)), const("flat", np.array([2, 18], dtype=np.int64)),
                        const("W", weight), const("b", np.zeros(3, np.float32))])
    rewritten, axis = make_batch_dynamic(proto, proto, "x")
    assert axis.rewritten
    shapes = {t.name: numpy_helper.to_array(t).tolist() for t in rewritten.graph.initializer if t.name not in ("W", "b")}
    assert sorted(shapes.values()) == [[-1, 18], [1, 3, 6]]
    loaded = load_model(save(proto, "expand.onnx"))
    converted = convert_model(loaded)
    assert converted.batch.rewritten and converted.module_batch is None
    x = np.random.default_rng(6).random((5, 1, 6)).astype(np.float32)
    expected = np.repeat(x, 3, axis=1).reshape(5, 18) @ weight.T
    assert np.abs(converted.logits(torch.from_numpy(x)).detach().numpy() - expected).max() <= 1e-5
    assert validate_against_onnxruntime(loaded, converted, x, device="cpu").passed


def test_cli_json_reports_a_kept_batch(save, capsys):
    path = save(_mixing_model()[0], "mixing.onnx")
    assert main(["inspect", str(path), "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)["batch"]
    assert batch["fixed"] == 4 and batch["rewritten"] is False and batch["module_batch"] == 4
    assert "samples interact" in batch["reason"]
    assert main(["validate", str(path), "--samples", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["samples"] == 6 and report["batch"]["rewritten"] is False
