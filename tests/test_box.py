"""Per-input boxes (`lo`/`hi` in the data file) and held coordinates: displacement bounds, a
closed-form worst margin of a linear model over a ball ∩ per-coordinate box, attacks inside it."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier import cli
from verifier.attacks import attack
from verifier.bounds.margins import margin_bounds
from verifier.box import Box, displacement_box
from verifier.convert import convert_model
from verifier.data import fit_box, load_samples
from verifier.errors import DataError, VerifierError
from verifier.onnx_io import load_model
from verifier.perturb import fitted_threat_box

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(3)
WEIGHT = RNG.normal(size=(4, 3)).astype(np.float32)
LOW = np.array([-1.0, 0.0, 0.2, -0.5], np.float32)
HIGH = np.array([1.0, 0.5, 0.9, 0.5], np.float32)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    folder = tmp_path_factory.mktemp("box")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"])], "lin",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(WEIGHT, "W")])
    path = folder / "lin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = (LOW + RNG.uniform(size=(16, 4)) * (HIGH - LOW)).astype(np.float32)
    y = (x @ WEIGHT).argmax(1)
    data = folder / "lin.npz"
    np.savez(data, x=x, y=y, lo=LOW, hi=HIGH)
    return str(path), str(data), x, y


def test_displacement_of_a_per_coordinate_box_with_held_coordinates():
    x = torch.tensor([[0.5, 0.25, 7.0, -3.0]], dtype=torch.float64)
    low, high = displacement_box(x, Box(np.array([0.0, 0.0]), np.array([1.0, 0.5]), (2,)))
    assert low.tolist() == [[-0.5, -0.25, 0.0, 0.0]] and high.tolist() == [[0.5, 0.25, 0.0, 0.0]]
    low, high = displacement_box(x[:, :2], (0.0, 1.0))  # a plain pair still works
    assert low.tolist() == [[-0.5, -0.25]] and high.tolist() == [[0.5, 0.75]]
    with pytest.raises(VerifierError, match="outside the box"):
        displacement_box(x, Box(0.0, 1.0))
    assert tuple(Box(np.array([0.0, -2.0]), np.array([1.0, 3.0]))) == (-2.0, 3.0)  # the envelope


def test_file_box_is_read_checked_and_rounded(linear, tmp_path):
    path, data, x, _ = linear
    samples = load_samples(data, load_model(path).info.data_input)
    assert samples.box is not None and samples.box.per_coordinate
    fitted = fit_box(samples.x, samples.box, samples.source)
    assert np.all(fitted.low <= LOW) and np.all(fitted.high >= HIGH)
    np.savez(tmp_path / "bad.npz", x=x, lo=np.zeros(3, np.float32), hi=np.ones(3, np.float32))
    with pytest.raises(DataError, match="does not broadcast"):
        load_samples(tmp_path / "bad.npz", load_model(path).info.data_input)
    np.savez(tmp_path / "out.npz", x=x, lo=LOW + 0.3, hi=HIGH)
    outside = load_samples(tmp_path / "out.npz", load_model(path).info.data_input)
    with pytest.raises(DataError, match="per-coordinate box"):
        fit_box(outside.x, outside.box, outside.source)


def test_worst_margin_over_ball_and_per_coordinate_box_is_the_closed_form(linear):
    path, data, x, y = linear
    samples = load_samples(data, load_model(path).info.data_input)
    box, _, _ = fitted_threat_box(samples, None, None)
    radius = 0.3
    bounds = margin_bounds(convert_model(load_model(path)), x, y, radius=radius, norm="inf", box=box)
    gains = WEIGHT.T[None, :, :] - WEIGHT.T[y][:, None, :]  # (N, C, d)
    step_up = np.minimum(radius, box.high - x)[:, None, :]
    step_down = np.maximum(-radius, box.low - x)[:, None, :]
    worst = (x @ WEIGHT - (x @ WEIGHT)[np.arange(len(y)), y][:, None]) + np.where(
        gains > 0, gains * step_up, gains * step_down).sum(-1)
    np.testing.assert_allclose(bounds.upper.numpy(), worst, atol=1e-5)


def test_attacks_stay_in_the_per_coordinate_box(linear):
    path, data, x, y = linear
    loaded = load_model(path)
    samples = load_samples(data, loaded.info.data_input)
    box, _, _ = fitted_threat_box(samples, None, None)
    report = attack(convert_model(loaded), loaded, x, y, ["pgd"], [0.5], p=math.inf, norm="inf", box=box, steps=5)
    atoms = report.results[0].atoms.numpy()
    assert np.all(atoms >= box.low - 1e-7) and np.all(atoms <= box.high + 1e-7)


def test_cli_uses_the_file_box_and_refuses_two_boxes(linear, capsys):
    path, data, *_ = linear
    code = cli.main(["certify", path, "--data", data, "--delta", "0.05", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["box"] == [-1.0, 1.0]  # the envelope of lo..hi
    code = cli.main(["certify", path, "--data", data, "--delta", "0.05", "--box", "0,1"])
    assert code == 2 and "keep one" in capsys.readouterr().err
