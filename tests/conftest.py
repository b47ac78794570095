"""Shared test helpers: paths of shipped models and tiny ONNX graphs built in memory."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT / "tools"))

SHIPPED = {
    "mlp_relu": ("digits_mlp_relu.onnx", "digits_test.npz"),
    "mlp_gelu": ("digits_mlp_gelu.onnx", "digits_test.npz"),
    "mlp_silu": ("digits_mlp_silu.onnx", "digits_test.npz"),
    "cnn": ("digits_cnn.onnx", "digits_test_image.npz"),
    "transformer": ("digits_transformer.onnx", "digits_test.npz"),
}

warnings.filterwarnings("ignore")

# Property tests are derandomised so that CI is reproducible (same examples every run).
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.load_profile("deterministic")


def shipped_model(name: str) -> Path:
    """Path of a shipped demo model by short name."""
    return MODELS / SHIPPED[name][0]


def shipped_data(name: str) -> Path:
    """Path of the sample data file that fits a shipped model."""
    return MODELS / SHIPPED[name][1]


def const(name: str, value) -> onnx.TensorProto:
    """A float32 (or given-dtype numpy) initializer."""
    array = np.asarray(value)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return numpy_helper.from_array(array, name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence]],
    outputs: Sequence[tuple[str, int, Sequence | None]],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    extra_opsets: Sequence[tuple[str, int]] = (),
) -> onnx.ModelProto:
    """A checked-in-memory model from nodes, (name, elem type, shape) specs and initializers."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="verifier-tests")
    model.ir_version = min(model.ir_version, 10)
    return model


def float_io(name: str, shape: Sequence) -> tuple[str, int, Sequence]:
    """A float32 input/output spec."""
    return (name, TensorProto.FLOAT, shape)


@pytest.fixture
def save(tmp_path: Path):
    """Save a ModelProto under tmp_path and return its path."""

    def _save(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        onnx.save(model, str(path))
        return path

    return _save


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches run faster on one intra-op thread (two spin ~30x slower on a shared 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
