"""Exact Jacobians and loss gradients agree with float64 central finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHIPPED, shipped_data, shipped_model

from verifier import errors
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.jacobian import loss_gradients, logits_jacobian, prepared_module
from verifier.losses import loss_values
from verifier.onnx_io import load_model

STEP = 1e-6


def _model_and_points(name: str, count: int = 6):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=count)
    rng = np.random.default_rng(1)
    # Points in general position (digit images have flat regions that tie MaxPool windows).
    x = samples.x.astype(np.float64) + 0.01 * rng.random(samples.x.shape)
    return converted, torch.from_numpy(x), torch.from_numpy(samples.y)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_logits_jacobian_matches_finite_differences(name):
    converted, x, _ = _model_and_points(name)
    result = logits_jacobian(converted, x, device="cpu", dtype=torch.float64)
    module = prepared_module(converted, "cpu", torch.float64)
    assert result.jacobian.shape == (len(x), 10, *x.shape[1:])
    assert torch.allclose(result.logits, module(x))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        finite = (module(x + STEP * direction) - module(x - STEP * direction)) / (2 * STEP)
        predicted = torch.einsum("nc...,n...->nc", result.jacobian, direction)
        assert torch.allclose(predicted, finite, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "margin", "dlr"])
@pytest.mark.parametrize("name", ["mlp_relu", "mlp_gelu", "cnn", "transformer"])
def test_loss_gradients_match_finite_differences(name, loss):
    converted, x, y = _model_and_points(name)
    result = loss_gradients(converted, x, y, loss, device="cpu", dtype=torch.float64)
    module = prepared_module(converted, "cpu", torch.float64)
    assert torch.allclose(result.values, loss_values(module(x), y, loss))
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    finite = (loss_values(module(x + STEP * direction), y, loss)
              - loss_values(module(x - STEP * direction), y, loss)) / (2 * STEP)
    predicted = (result.gradients * direction).flatten(1).sum(1)
    assert torch.allclose(predicted, finite, atol=1e-6, rtol=1e-5)


def test_chunking_does_not_change_results():
    converted, x, y = _model_and_points("mlp_silu", count=20)
    whole = logits_jacobian(converted, x, device="cpu", dtype=torch.float64)
    tiny = logits_jacobian(converted, x, device="cpu", dtype=torch.float64, memory_bytes=1)
    assert torch.allclose(whole.jacobian, tiny.jacobian, atol=1e-12)
    grads = loss_gradients(converted, x, y, "ce", device="cpu", dtype=torch.float64, memory_bytes=1)
    assert torch.allclose(grads.gradients, loss_gradients(converted, x, y, "ce", "cpu", torch.float64).gradients)


def test_fixed_batch_of_one_model(tmp_path):
    import digits_models

    module = digits_models.build("mlp_gelu").eval()
    path = tmp_path / "fixed.onnx"
    digits_models.export_onnx(module, "mlp_gelu", path, opset=18, dynamo=True, batch=1)
    converted = convert_model(load_model(path))
    x = torch.rand(5, 64, dtype=torch.float64)
    result = logits_jacobian(converted, x, device="cpu", dtype=torch.float64)
    reference = module.double()
    expected = torch.stack([torch.autograd.functional.jacobian(lambda v: reference(v.unsqueeze(0)).squeeze(0), v)
                            for v in x])
    assert torch.allclose(result.jacobian, expected, atol=1e-10)


def test_margin_gradient_on_linear_model_is_closed_form():
    """For z = W x + b the margin gradient is w_j* - w_y exactly."""
    converted, x, y = _model_and_points("mlp_relu", count=4)
    jac = logits_jacobian(converted, x, device="cpu", dtype=torch.float64)
    grads = loss_gradients(converted, x, y, "margin", device="cpu", dtype=torch.float64)
    best_other = jac.logits.clone()
    best_other[torch.arange(len(y)), y] = -torch.inf
    j = best_other.argmax(1)
    expected = jac.jacobian[torch.arange(len(y)), j] - jac.jacobian[torch.arange(len(y)), y]
    assert torch.allclose(grads.gradients, expected, atol=1e-12)


def test_zero_one_has_no_gradient():
    converted, x, y = _model_and_points("mlp_relu", count=2)
    with pytest.raises(errors.UsageError, match="no gradient"):
        loss_gradients(converted, x, y, "zero_one")


def test_batched_jacobian_of_outputs_reached_only_through_an_integer_cast_is_zero():
    """A held integer input reaches the activations through Cast(int64), which autograd does not
    cross: those units do not move with the input, so their Jacobian is zero (not an error)."""
    from verifier.jacobian import batched_jacobian

    x = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    held = batched_jacobian(lambda v: (v[:, 1:].long().double() * 2.0), x, 2)
    assert held.shape == (2, 2, 3) and not held.any()
    free = batched_jacobian(lambda v: v[:, :2] * 3.0, x, 2)
    assert torch.equal(free, 3.0 * torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3))
