"""HardSigmoid outside a HardSwish becomes Clip(alpha x + beta, 0, 1): same values, bounded, sound."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import const, float_io, make_model
from onnx import helper

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.convert import convert_model
from verifier.onnx_io import load_model

N = helper.make_node


def _gated(opset: int):
    """x -> h = W1 x; gate = HardSigmoid(W2 x) (alpha 0.3, beta 0.4); s = HardSwish(h) as
    h * HardSigmoid(h) (alpha 1/6); y = W3 (gate * s)."""
    rng = np.random.default_rng(1)
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h"], transB=1), N("Gemm", ["x", "w2", "b2"], ["g"], transB=1),
             N("HardSigmoid", ["g"], ["gate"], alpha=0.3, beta=0.4),
             N("HardSigmoid", ["h"], ["hs"], alpha=1.0 / 6.0, beta=0.5), N("Mul", ["h", "hs"], ["swish"]),
             N("Mul", ["gate", "swish"], ["z"]), N("Gemm", ["z", "w3", "b3"], ["y"], transB=1)]
    inits = [const("w1", rng.normal(size=(5, 4))), const("b1", rng.normal(size=5)),
             const("w2", rng.normal(size=(5, 4)) * 3), const("b2", rng.normal(size=5)),
             const("w3", rng.normal(size=(3, 5))), const("b3", rng.normal(size=3))]
    return make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 3])], inits, opset=opset)


@pytest.mark.parametrize("opset", [9, 17])
def test_hard_sigmoid_gate_is_a_clip_site_and_bounds_are_sound(tmp_path, opset):
    model = _gated(opset)
    path = tmp_path / "gated.onnx"
    path.write_bytes(model.SerializeToString())
    converted = convert_model(load_model(path))
    assert sorted(site.kind for site in converted.logit_sites) == ["clip", "hard_swish"]
    rng = np.random.default_rng(2)
    x = rng.uniform(-2, 2, size=(64, 4)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = converted.logits_module(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - expected).max() < 1e-5
    # The gate is clipped at both ends for some samples and linear for others: every piece is used.
    gate = np.clip(0.3 * (x @ _weights(model, "w2").T + _weights(model, "b2")) + 0.4, 0, 1)
    assert (gate == 0).any() and (gate == 1).any() and ((gate > 0) & (gate < 1)).any()
    network = BoundNetwork.from_model(converted)
    centre = torch.from_numpy(x[:8].astype(np.float64))
    labels = torch.from_numpy(expected[:8].argmax(1))
    radius = 0.3
    bounds = margin_bounds(network, centre, labels, radius, "inf", box=(-2.5, 2.5), device="cpu")
    assert torch.isfinite(bounds.upper).all()
    module = converted.logits_module.double()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        moved = (centre + (torch.rand(centre.shape, generator=generator, dtype=torch.float64) * 2 - 1) * radius)
        logits = module(moved.clamp(-2.5, 2.5)).detach()
        worst = (logits - logits.gather(1, labels[:, None])).scatter(1, labels[:, None], -math.inf).max(1).values
        assert torch.all(worst <= bounds.worst_margin + 1e-9)


def _weights(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
