"""The Jacobian route: interval gradients bound every sampled gradient, exact inside ReLU cells."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier.bounds.slopes import slope_bounds
from verifier.cells import cell_analysis
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.geometry import dual_norm
from verifier.onnx_io import load_model


def _setup(name: str, count: int = 12):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=count)
    return converted, torch.from_numpy(samples.x).double(), torch.from_numpy(samples.y)


def _margin_gradients(module, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact gradients of every z_j - z_y at the points (N, C, d)."""
    jac = torch.autograd.functional.jacobian(lambda v: module(v).sum(0), points).movedim(0, 1).flatten(2)
    return jac - jac[torch.arange(len(points)), labels].unsqueeze(1)


@pytest.mark.parametrize("norm,radius", [("inf", 0.02), ("2", 0.2), ("1", 0.6)])
@pytest.mark.parametrize("name", ["mlp_relu", "mlp_gelu", "mlp_silu", "cnn"])
def test_slope_bounds_dominate_sampled_gradients(name, norm, radius):
    converted, x, y = _setup(name)
    bounds = slope_bounds(converted, x, y, radius, norm, box=(0.0, 1.0), device="cpu")
    module = converted.logits_module.double()
    generator = torch.Generator().manual_seed(0)
    orders = {"inf": math.inf, "2": 2.0, "1": 1.0}
    for _ in range(6):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        direction = direction / torch.linalg.vector_norm(direction.flatten(1), orders[norm], dim=1).reshape(
            -1, *[1] * (x.dim() - 1))
        point = (x + radius * torch.rand(1, generator=generator, dtype=torch.float64) * direction).clamp(0, 1)
        gradients = dual_norm(_margin_gradients(module, point, y), norm)
        assert torch.all(gradients <= bounds.per_class + 1e-9)
    assert bounds.unsupported == ()
    assert torch.all(torch.isfinite(bounds.loss_slope))


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_inside_the_cell_the_slope_is_exact(norm):
    converted, x, y = _setup("mlp_relu")
    cells = cell_analysis(converted, x, y, norm, box=(0.0, 1.0), device="cpu")
    bounds = slope_bounds(converted, x, y, 0.9 * cells.radius, norm, box=(0.0, 1.0), device="cpu")
    exact = dual_norm(cells.jacobian - cells.jacobian[torch.arange(len(y)), y].unsqueeze(1), norm)
    assert torch.allclose(bounds.per_class, exact, atol=1e-10)


def test_transformer_slopes_pass_through_the_decomposed_attention_and_layer_norms():
    """Finite and sound through products, Softmax and LayerNorm pieces; near a point, nearly exact."""
    converted, x, y = _setup("transformer", 4)
    module = converted.logits_module.double()
    bounds = slope_bounds(converted, x, y, 1e-3, "inf", box=(0.0, 1.0), device="cpu")
    assert bounds.unsupported == () and torch.all(torch.isfinite(bounds.loss_slope))
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        point = (x + 1e-3 * (2 * torch.rand(x.shape, generator=generator, dtype=torch.float64) - 1)).clamp(0, 1)
        assert torch.all(dual_norm(_margin_gradients(module, point, y), "inf") <= bounds.per_class + 1e-9)
    at_centre = dual_norm(_margin_gradients(module, x, y), "inf")
    tight = slope_bounds(converted, x, y, 1e-9, "inf", box=(0.0, 1.0), device="cpu").per_class
    assert torch.all(at_centre <= tight + 1e-9) and torch.all(tight <= 1.01 * at_centre + 1e-9)


def test_a_sum_across_ranks_goes_back_through_the_vjp():
    """`add_variables` writes no adjoint for inputs of different ranks (it returns None): the slope pass
    takes the generic transpose there, and both gradients are the rows summed to each input's shape."""
    import torch

    from verifier.bounds import ops
    from verifier.bounds.slopes import _affine_backward

    rule = ops.add_variables([1.0, -1.0])
    low = torch.arange(24, dtype=torch.float64).reshape(2, 1, 3, 4) - 12
    high = low + 1.0
    (first_low, first_high), (second_low, second_high) = _affine_backward(
        rule, (low, high), [torch.Size([3, 4]), torch.Size([4])])
    assert torch.equal(first_low, low) and torch.equal(first_high, high)
    assert torch.equal(second_low, -high.sum(2)) and torch.equal(second_high, -low.sum(2))
