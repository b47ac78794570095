"""The bounds' batch invariant (verifier.bounds.batch_axis): graphs that move the batch off axis 0
are refused when the bound network is built, naming the node; torch's own TransformerEncoderLayer
(both exporters) converts, folds its shape arithmetic, and certify falls back with that note."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import float_io, make_model
from onnx import helper
from test_decompose import _export

from verifier import cli
from verifier.bounds.network import BoundNetwork
from verifier.convert import convert_model
from verifier.errors import UnsupportedOpsError
from verifier.onnx_io import load_model


def _transposed(save, back: bool):
    """x (N, 3, 4) -> Transpose(1, 0, 2) [-> Relu -> back] -> ReduceSum over the tokens -> (N, 4)."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="moves")]
    if back:  # a Relu between the two keeps the optimiser from cancelling them
        nodes += [helper.make_node("Relu", ["t"], ["r"], name="relu"),
                  helper.make_node("Transpose", ["r"], ["u"], perm=[1, 0, 2], name="returns")]
    nodes.append(helper.make_node("ReduceSum", ["u" if back else "t", "axes"], ["y"], keepdims=0, name="sums"))
    axes = onnx.numpy_helper.from_array(np.array([1 if back else 0], dtype=np.int64), "axes")
    path = save(make_model(nodes, [float_io("x", ["N", 3, 4])], [float_io("y", ["N", 4])], [axes]))
    return convert_model(load_model(path))


def test_a_transpose_that_moves_the_batch_is_refused_naming_it(save):
    with pytest.raises(UnsupportedOpsError) as err:
        BoundNetwork.from_model(_transposed(save, back=False))
    assert err.value.nodes[0][:2] == ("moves", "Transpose") and len(err.value.nodes) == 1
    assert "moves the batch off axis 0 (shape (3, 1, 4) for 1 sample, (3, 2, 4) for 2)" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_op_that_mixes_rows_is_refused(save):
    """x - mean over the batch keeps the shape but mixes the samples."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1, name="batch_mean"),
             helper.make_node("Sub", ["x", "m"], ["y"], name="centred")]
    path = save(make_model(nodes, [float_io("x", ["N", 3])], [float_io("y", ["N", 3])]))
    with pytest.raises(UnsupportedOpsError) as err:
        BoundNetwork.from_model(convert_model(load_model(path)))
    # the mean is one row for any batch: refused at the mean, as a moved batch
    assert err.value.nodes[0][:2] == ("batch_mean", "ReduceMean") and "batch off axis 0" in str(err.value)


def test_a_batch_moved_and_moved_back_is_still_refused_at_the_first_move(save):
    """The invariant is per tensor: back-substitution would cross the moved tensor."""
    with pytest.raises(UnsupportedOpsError) as err:
        BoundNetwork.from_model(_transposed(save, back=True))
    assert err.value.nodes[0][0] == "moves"


class _EncoderModel(torch.nn.Module):
    """A user's first Transformer: Linear embedding, nn.TransformerEncoderLayer, mean, Linear head."""

    def __init__(self, activation: str, norm_first: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(2, 8)
        self.layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True,
                                                      dropout=0.0, activation=activation, norm_first=norm_first)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.layer(self.embed(x.reshape(x.shape[0], 3, 2))).mean(1))


_VARIANTS = {"legacy-relu": (False, "relu", False), "legacy-gelu-normfirst": (False, "gelu", True),
             "dynamo-gelu-normfirst": (True, "gelu", True)}  # a dynamo export costs ~15 s on the 2-core box


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, str]:
    """Each variant exported once (seeded weights): name -> path."""
    folder = tmp_path_factory.mktemp("encoders")
    paths = {}
    for name, (dynamo, activation, norm_first) in _VARIANTS.items():
        torch.manual_seed(0)
        paths[name] = str(folder / f"{name}.onnx")
        _export(_EncoderModel(activation, norm_first).eval(), 6, paths[name], dynamo)
    return paths


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_torch_encoder_layer_converts_folds_and_is_refused_by_the_bounds_naming_the_transpose(encoders, variant):
    path = encoders[variant]
    converted = convert_model(load_model(path))
    ops_left = {n.op_type for n in converted.normalized.graph.node}
    assert not ops_left & {"Shape", "Size"}  # no run-time shape arithmetic is left (38 nodes before the fold)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for count in (1, 5):  # the folded, batch-freed module computes what the user's file does
        x = np.random.default_rng(count).uniform(-1, 1, size=(count, 6)).astype(np.float32)
        expected = session.run(None, {"x": x})[0]
        got = converted.logits_module(torch.from_numpy(x)).detach().numpy()
        assert np.allclose(got, expected, atol=1e-5)
    with pytest.raises(UnsupportedOpsError) as err:
        BoundNetwork.from_model(converted)
    (node, op, why), = err.value.nodes
    assert op == "Transpose" and why.startswith("moves the batch off axis 0 (shape (3, 1, 8) for 1 sample")


def test_certify_on_the_encoder_layer_falls_back_with_the_note(encoders, tmp_path, capsys):
    path = encoders["dynamo-gelu-normfirst"]
    data = tmp_path / "data.npz"
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 6)).astype(np.float32)
    np.savez(data, x=x, y=np.zeros(3, dtype=np.int64))
    code = cli.main(["certify", path, "--data", str(data), "--delta", "1/255", "--box", "-1,1", "--json",
                     "--exact", "off"])
    out = capsys.readouterr().out
    assert code == 0
    fallbacks = json.loads(out)["fallbacks"]
    moved = [f for f in fallbacks if "moves the batch off axis 0" in f]
    assert len(moved) == 1 and "Transpose at node 'node_transpose'" in moved[0]
