"""The CUDA path (`--device cuda`) computes what the CPU computes: bounds, cells, certify and the
attacks. Skipped without a GPU (CI has none); tools/gpu_check.sh runs it where one is lent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier.attacks import attack
from verifier.bounds.margins import margin_bounds
from verifier.cells import cell_analysis
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.onnx_io import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _shipped(name: str, count: int):
    loaded = load_model(shipped_model(name))
    data = np.load(shipped_data(name))
    return loaded, convert_model(loaded), data["x"][:count], data["y"][:count]


@pytest.mark.parametrize("name", ["mlp_relu", "mlp_gelu", "cnn", "transformer"])
def test_margin_bounds_on_cuda_equal_the_cpu_ones(name):
    _, converted, x, y = _shipped(name, 16)
    on = {device: margin_bounds(converted, x, y, 2 / 255, "inf", box=(0.0, 1.0), device=device).upper.cpu()
          for device in ("cpu", "cuda")}
    torch.testing.assert_close(on["cuda"], on["cpu"], rtol=1e-9, atol=1e-9)


def test_cells_on_cuda_equal_the_cpu_ones():
    _, converted, x, y = _shipped("mlp_relu", 16)
    cpu = cell_analysis(converted, x, y, "inf", box=(0.0, 1.0), device="cpu")
    cuda = cell_analysis(converted, x, y, "inf", box=(0.0, 1.0), device="cuda").to("cpu")
    torch.testing.assert_close(cuda.radius, cpu.radius, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cuda.jacobian, cpu.jacobian, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp_relu", "cnn"])
def test_certify_on_cuda_equals_the_cpu_certificate(name):
    _, converted, x, y = _shipped(name, 24)
    results = {device: certify(converted, x, y, [1 / 255, 4 / 255], p=2.0, norm="inf", box=(0.0, 1.0),
                               grid_points=8, device=device) for device in ("cpu", "cuda")}
    for cpu, cuda in zip(results["cpu"].results, results["cuda"].results):
        assert cuda.certificate == pytest.approx(cpu.certificate, rel=1e-7, abs=1e-9)
        assert cuda.certified_accuracy == pytest.approx(cpu.certified_accuracy, abs=1 / 24)


def test_attacks_on_cuda_stay_within_budget_and_near_the_cpu_risk():
    loaded, converted, x, y = _shipped("mlp_relu", 32)
    reports = {device: attack(converted, loaded, x, y, ["pgd", "wdapp"], [4 / 255], p=2.0, norm="inf",
                              box=(0.0, 1.0), steps=20, device=device) for device in ("cpu", "cuda")}
    for cpu, cuda in zip(reports["cpu"].results, reports["cuda"].results):
        assert cuda.transport_cost <= cuda.delta * (1 + 1e-9)
        assert cuda.risk == pytest.approx(cpu.risk, rel=0.05)  # float32 kernels differ; same attack
