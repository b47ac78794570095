"""Shape arithmetic the optimizer leaves (torch's F.pad export, run-time size arithmetic) folded by
running it (`verifier.convert.fold`): the converted graph has no Shape left, computes what the
file does at every batch size, and gets sound linear bounds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.convert import convert_model
from verifier.convert.fold import static_values_folded
from verifier.onnx_io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _Padded(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(3 * 5 * 9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = torch.relu(self.conv(F.pad(x, (1, 1, 1, 1))))  # a ConstantOfShape/Concat/Slice chain for the pads
        extra = (h.shape[-1] + 1) // 3  # size arithmetic at run time: Shape -> Gather -> Add -> Div
        return self.head(F.pad(h, (extra, extra, 0, 0)).flatten(1))


def _export(path, dynamic: bool) -> str:
    torch.manual_seed(0)
    axes = {"x": {0: "n"}, "y": {0: "n"}} if dynamic else None
    torch.onnx.export(_Padded().eval(), (torch.zeros(1, 2, 5, 5),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes=axes)
    return str(path)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "batch-1"])
def test_run_time_padding_arithmetic_is_folded_and_bounds_hold(tmp_path, dynamic):
    path = _export(tmp_path / "padded.onnx", dynamic)
    assert {"Shape", "ConstantOfShape"} <= {n.op_type for n in onnx.load(path).graph.node}
    converted = convert_model(load_model(path))
    assert not {n.op_type for n in converted.normalized.graph.node} & {"Shape", "ConstantOfShape", "Gather"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for count in (1, 5):
        x = np.random.default_rng(count).uniform(0, 1, size=(count, 2, 5, 5)).astype(np.float32)
        rows = [session.run(None, {"x": row[None]})[0] for row in x]  # one at a time: batch-1 files too
        got = converted.logits_module(torch.from_numpy(x)).detach().numpy()
        assert np.allclose(got, np.concatenate(rows), atol=1e-5)
    network = BoundNetwork.from_model(converted)  # refused before: "Shape ... no bound rule"
    module = converted.logits_module.double()
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, size=(3, 2, 5, 5)))
    y = module(x).argmax(1)
    radius = 0.01
    bound = margin_bounds(network, x, y, radius, "inf", box=(0.0, 1.0), device="cpu").upper
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):  # random points of the ball never exceed the bound
        point = (x + radius * (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1)).clamp(0, 1)
        logits = module(point).detach()
        margins = logits - logits.gather(1, y[:, None])
        assert torch.all(margins <= bound + 1e-9)


def test_nothing_is_folded_without_static_sizes(tmp_path):
    model = onnx.load(_export(tmp_path / "padded.onnx", True))  # the batch axis is symbolic
    assert static_values_folded(model, "x") is None


def test_a_shape_that_follows_the_data_is_not_folded():
    # the count of non-integer entries (NonZero): 0 at zeros and at ones, 4 on most data; a fold on
    # probes would bake one count in
    from conftest import const, float_io, make_model
    from onnx import helper

    node = helper.make_node
    nodes = [node("Round", ["x"], ["r"]), node("Sub", ["x", "r"], ["d"]), node("NonZero", ["d"], ["nz"]),
             node("Shape", ["nz"], ["s"]), node("Gather", ["s", "one"], ["n"], axis=0),
             node("Cast", ["n"], ["nf"], to=1), node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             node("Add", ["h", "nf"], ["y"])]
    inits = [const("one", np.array(1, np.int64)), const("w", np.eye(3, 4)), const("b", np.zeros(3))]
    model = make_model(nodes, [float_io("x", [1, 4])], [float_io("y", [1, 3])], inits)
    assert static_values_folded(model, "x") is None
    # a Shape of the input itself (sizes only) is folded
    nodes = [node("Shape", ["x"], ["s"]), node("Gather", ["s", "one"], ["n"], axis=0),
             node("Cast", ["n"], ["nf"], to=1), node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             node("Add", ["h", "nf"], ["y"])]
    folded = static_values_folded(make_model(nodes, [float_io("x", [1, 4])], [float_io("y", [1, 3])], inits), "x")
    assert folded is not None and "Shape" not in {n.op_type for n in folded.graph.node}
