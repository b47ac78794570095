"""`tools/examples.py` writes the files the README's interface examples run on: each model loads,
its data matches its inputs (npz keys = input names for `--perturb`), and the VNN-LIB property
parses with its box around a point the net classifies as class 0."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from verifier.onnx_io import load_model
from verifier.vnnlib import read_property

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
examples = pytest.importorskip("examples")
pytest.importorskip("skl2onnx")


def test_examples_are_written_and_consistent(tmp_path):
    assert examples.main([str(tmp_path)]) == 0
    for model, data in (("logreg", "digits"), ("columns", "wine"), ("two", "two"), ("text", "ids")):
        loaded = load_model(tmp_path / f"{model}.onnx", any_inputs=True)
        arrays = np.load(tmp_path / f"{data}.npz")
        names = [spec.name for spec in loaded.info.inputs]
        keys = names if len(names) > 1 else ["x"]
        assert set(keys) | {"y"} == set(arrays.files) and len(arrays["y"]) >= 16
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    prop = read_property(str(tmp_path / "prop.vnnlib"))
    assert prop is not None
    text = (tmp_path / "prop.vnnlib").read_text()
    bounds = [float(line.split()[-1].rstrip(")")) for line in text.splitlines() if line.startswith("(assert (")
              and "X_" in line]
    centre = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2], np.float32)
    assert session.run(None, {"x": centre[None]})[0].argmax() == 0
