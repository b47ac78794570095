"""Every shipped architecture, re-exported by both torch exporters at opsets 17/18/20, converts
and agrees with onnxruntime at a batch size different from the export's."""

from __future__ import annotations

import digits_models
import numpy as np
import pytest
import torch
from conftest import MODELS

from verifier.convert import convert_model
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

EXPORT_BATCH = 2
RUN_BATCH = 7


def _trained_like(name: str) -> torch.nn.Module:
    """A freshly initialised module with non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(0)
    module = digits_models.build(name)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    return module.eval()


@pytest.mark.parametrize("opset", [17, 18, 20])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("name", digits_models.NAMES)
def test_reexport_converts_and_matches(tmp_path, name, dynamo, opset):
    module = _trained_like(name)
    path = tmp_path / f"{name}.onnx"
    digits_models.export_onnx(module, name, path, opset=opset, dynamo=dynamo, batch=None)
    loaded = load_model(path)
    assert loaded.info.opset == opset
    converted = convert_model(loaded)
    x = np.random.default_rng(opset).uniform(size=(RUN_BATCH, *digits_models.input_shape(name))).astype(np.float32)
    report = validate_against_onnxruntime(loaded, converted, x, atol=1e-5, rtol=1e-5)
    assert report.passed, report.to_dict()
    assert report.top1_agreement == 1.0
    with torch.no_grad():
        expected = module(torch.from_numpy(x))
    assert torch.allclose(converted.logits(torch.from_numpy(x)), expected, atol=1e-5)
    kinds = sorted({site.kind for site in converted.sites})
    assert kinds == {"mlp_relu": ["relu"], "mlp_gelu": ["gelu"], "mlp_silu": ["silu"], "cnn": ["max_pool", "relu"],
                     "transformer": ["gelu", "softmax"]}[name]


def test_make_models_quick_smoke(tmp_path):
    """tools/make_models.py --quick writes every model and data file, each of which validates."""
    import make_models

    assert make_models.main(["--quick", "--out", str(tmp_path)]) == 0
    shipped = sorted(p.name for p in MODELS.glob("*.onnx"))
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == shipped
    data = np.load(tmp_path / "digits_test.npz")
    assert data["x"].shape == (360, 64) and data["y"].dtype == np.int64
    loaded = load_model(tmp_path / "digits_mlp_relu.onnx")
    report = validate_against_onnxruntime(loaded, convert_model(loaded), data["x"][:32])
    assert report.passed
