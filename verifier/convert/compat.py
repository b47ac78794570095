"""Importing onnx2torch on a CPU build of torch.

onnx2torch imports torchvision at import time for its NonMaxSuppression and RoiAlign
converters. PyPI's torchvision is built against CUDA torch and fails to import beside the CPU
wheel (`operator torchvision::nms does not exist`). When that happens a stub stands in for
torchvision during the import only; the two converters that need it then raise a clear error.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

_TORCHVISION_MODULES = ("torchvision", "torchvision.ops")


def _unavailable(*_args, **_kwargs):
    raise RuntimeError("torchvision is not importable here: NonMaxSuppression/RoiAlign cannot run")


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_onnx2torch() -> ModuleType:
    """Import onnx2torch, standing in for a broken torchvision only while it imports."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    try:
        importlib.import_module("torchvision")
        return importlib.import_module("onnx2torch")
    except Exception:  # noqa: BLE001 - torchvision fails with RuntimeError/ImportError/OSError
        _forget_torchvision()
    stub = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.batched_nms = _unavailable
    stub.ops = ops
    sys.modules.update(dict(zip(_TORCHVISION_MODULES, (stub, ops))))
    try:
        return importlib.import_module("onnx2torch")
    finally:
        _forget_torchvision()
