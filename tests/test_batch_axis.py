"""The bounds' batch invariant (verifier.bounds.batch_axis): tensors that hold the batch off axis 0
are laid out per sample; graphs that cannot be are refused when the bound network is built, naming
the node, and certify falls back with that note. torch's own TransformerEncoderLayer (both
exporters) folds its shape arithmetic, converts, and gets sound linear bounds."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import float_io, make_model
from onnx import helper
from test_decompose import _attacked, _export

from verifier import cli
from verifier.bounds import ops
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, propagate, upper_bound
from verifier.convert import convert_model
from verifier.errors import UnsupportedOpsError
from verifier.losses import loss_values
from verifier.onnx_io import load_model


def _batch_mean_model(save):
    """y = x - mean over the batch: one row for any batch, then every row mixed with the others."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1, name="batch_mean"),
             helper.make_node("Sub", ["x", "m"], ["y"], name="centred")]
    return save(make_model(nodes, [float_io("x", ["N", 3])], [float_io("y", ["N", 3])]))


def test_an_op_over_the_batch_is_refused_naming_it(save):
    with pytest.raises(UnsupportedOpsError) as err:
        BoundNetwork.from_model(convert_model(load_model(_batch_mean_model(save))))
    assert err.value.nodes == (("batch_mean", "ReduceMean", "moves the batch off axis 0 in a way the bounds cannot "
                                "follow (shape (1, 3) for 1 sample, (1, 3) for 2: no single axis holds it)"),)
    assert "\n" not in str(err.value)


def test_a_transposed_batch_is_laid_out_per_sample_and_bounded_exactly(save):
    """x (N, 3, 4) -> Transpose(1, 0, 2) -> Relu -> Transpose back -> ReduceSum over the tokens: the
    middle tensors hold the batch on axis 1, the bounds act per sample and are those of relu-sums."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="moves"),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["u"], perm=[1, 0, 2], name="returns"),
             helper.make_node("ReduceSum", ["u", "axes"], ["y"], keepdims=0, name="sums")]
    axes = onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    path = save(make_model(nodes, [float_io("x", ["N", 3, 4])], [float_io("y", ["N", 4])], [axes]))
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, size=(5, 3, 4)))
    assert torch.allclose(network.evaluate(x), torch.relu(x).sum(1))
    radius = 0.3
    region = InputSet(x, torch.full((5,), radius, dtype=torch.float64), "inf",
                      torch.full((5, 12), -math.inf, dtype=torch.float64), torch.full((5, 12), math.inf,
                                                                                         dtype=torch.float64))
    rows = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    state = propagate(network, region)
    upper = upper_bound(network, state, region, network.output, rows)
    assert torch.allclose(upper, torch.relu(x + radius).sum(1), atol=1e-12)  # relu-sum's max is exact at x + r


class _EncoderModel(torch.nn.Module):
    """A user's first Transformer: Linear embedding, nn.TransformerEncoderLayer, mean, Linear head."""

    def __init__(self, activation: str, norm_first: bool, causal: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(2, 8)
        self.layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True,
                                                      dropout=0.0, activation=activation, norm_first=norm_first)
        self.head = torch.nn.Linear(8, 3)
        # a causal mask (both exporters write it as Add of a constant with -inf above the diagonal)
        self.mask = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1) if causal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.layer(self.embed(x.reshape(x.shape[0], 3, 2)), src_mask=self.mask).mean(1))


_VARIANTS = {"legacy-relu": (False, "relu", False, False), "legacy-gelu-normfirst": (False, "gelu", True, False),
             "dynamo-gelu-normfirst": (True, "gelu", True, False),  # a dynamo export costs ~15 s on the 2-core box
             "legacy-relu-causal": (False, "relu", False, True), "dynamo-gelu-causal": (True, "gelu", False, True)}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, str]:
    """Each variant exported once (seeded weights): name -> path."""
    folder = tmp_path_factory.mktemp("encoders")
    paths = {}
    for name, (dynamo, activation, norm_first, causal) in _VARIANTS.items():
        torch.manual_seed(0)
        paths[name] = str(folder / f"{name}.onnx")
        _export(_EncoderModel(activation, norm_first, causal).eval(), 6, paths[name], dynamo)
    return paths


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_torch_encoder_layer_folds_converts_and_gets_sound_linear_bounds(encoders, variant):
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
    network = BoundNetwork.from_model(converted)
    assert not any(type(n.rule) is ops.Interval for n in network.nodes)  # every op passes linear bounds
    # a masked Softmax drops the -inf entries: its reciprocal is followed by the kept rows (a Mul by 0/1)
    masked = [n.name for n in network.nodes if n.op == "Mul" and n.inputs[0].endswith(".reciprocal")]
    assert len(masked) == (1 if _VARIANTS[variant][3] else 0)
    probe = torch.from_numpy(np.random.default_rng(7).uniform(-1, 1, size=(3, 6)))
    torch.testing.assert_close(network.evaluate(probe), converted.logits_module.double()(probe), rtol=1e-6, atol=1e-6)
    module = converted.logits_module.double()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, size=(4, 6)))
    y = module(x).argmax(1)
    clean = loss_values(module(x), y, "margin").detach()
    whole = margin_bounds(network, x, y, math.inf, "inf", box=(-1.0, 1.0), device="cpu").worst_margin
    radius = 1 / 255
    bound = margin_bounds(network, x, y, radius, "inf", box=(-1.0, 1.0), device="cpu").worst_margin
    found = _attacked(module, x, y, radius, box=(-1.0, 1.0))
    assert torch.all(clean <= found + 1e-12) and torch.all(found <= bound + 1e-9)
    assert torch.all(bound < whole)
    # the bound's excess over the clean margin: 1.016x the attack's on the six audit-12 exports
    # (relu, gelu, gelu-tanh; 4 samples at 1/255), against ~2000-9000x for the whole-box bound
    assert float((bound - clean).mean()) < 1.25 * float((found - clean).mean())


def _certify(capsys, path, x: np.ndarray, folder) -> dict:
    data = folder / "data.npz"
    np.savez(data, x=x.astype(np.float32), y=np.zeros(len(x), dtype=np.int64))
    code = cli.main(["certify", str(path), "--data", str(data), "--delta", "1/255", "--box", "-1,1", "--json",
                     "--exact", "off"])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_certify_on_a_refused_graph_falls_back_with_the_note(save, tmp_path, capsys):
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 3))
    payload = _certify(capsys, _batch_mean_model(save), x, tmp_path)
    moved = [f for f in payload["fallbacks"] if "moves the batch off axis 0" in f]
    assert len(moved) == 1 and "ReduceMean at node 'batch_mean'" in moved[0]
