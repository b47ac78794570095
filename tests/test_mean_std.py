"""`--mean`/`--std`: the box of a normalised input, `((lo - mean_c) / std_c, (hi - mean_c) / std_c)`
per channel (`verifier.box.normalised_box`) in closed form, its channel axis, its refusals, and
the CLI giving exactly the certificate of the same box written as the data file's lo/hi."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from verifier import cli
from verifier.box import normalised_box
from verifier.errors import VerifierError

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_channels_first_box_is_the_closed_form():
    box = normalised_box(MEAN, STD, (3, 2, 2))
    mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
    np.testing.assert_allclose(box.low, -mean / std)
    np.testing.assert_allclose(box.high, (1 - mean) / std)
    assert box.low.shape == (3, 1, 1) and tuple(box) == (float((-mean / std).min()), float(((1 - mean) / std).max()))
    raw = normalised_box(MEAN, STD, (3, 2, 2), raw=(0.0, 255.0))
    np.testing.assert_allclose(raw.high, (255 - mean) / std)


def test_channels_last_and_one_value():
    box = normalised_box(MEAN, STD, (4, 5, 3))  # no earlier axis of size 3: the last one
    assert box.low.shape == (1, 1, 3)
    np.testing.assert_allclose(box.low.reshape(-1), -np.array(MEAN) / np.array(STD))
    single = normalised_box((0.5,), (0.25,), (7,))
    assert (single.low, single.high) == (-2.0, 2.0)


@pytest.mark.parametrize("mean,std,shape,match", [
    ((0.5, 0.5), (0.2,), (2, 4), "same number"),
    ((0.5,), (0.0,), (4,), "> 0"),
    ((0.5, 0.5), (0.2, 0.2), (3, 4), "no axis"),
])
def test_refusals(mean, std, shape, match):
    with pytest.raises(VerifierError, match=match):
        normalised_box(mean, std, shape)


@pytest.fixture()
def channel_model(tmp_path):
    """x (N, 3, 2) -> Flatten -> MatMul: 3 logits; data in the normalised box, labels its argmax."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"], axis=1),
                               helper.make_node("MatMul", ["f", "W"], ["logits"])], "lin",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(weight, "W")])
    path = tmp_path / "lin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    mean, std = np.array(MEAN)[:, None], np.array(STD)[:, None]
    x = ((rng.uniform(size=(8, 3, 2)) - mean) / std).astype(np.float32)
    y = (x.reshape(8, -1) @ weight).argmax(1)
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez(tmp_path / "boxed.npz", x=x, y=y, lo=(-mean / std).astype(np.float32),
             hi=((1 - mean) / std).astype(np.float32))
    return path, tmp_path


def test_cli_mean_std_is_the_file_box(channel_model, capsys):
    path, folder = channel_model
    common = ["certify", str(path), "--delta", "0.5", "--grid-points", "4", "--exact", "off", "--json"]
    normalised = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
    assert cli.main([*common, "--data", str(folder / "plain.npz"), *normalised]) == 0
    with_options = json.loads(capsys.readouterr().out)
    assert cli.main([*common, "--data", str(folder / "boxed.npz")]) == 0
    with_file = json.loads(capsys.readouterr().out)
    assert with_options["box"] == with_file["box"]
    for a, b in zip(with_options["results"], with_file["results"], strict=True):
        assert a["certificate"] == pytest.approx(b["certificate"], rel=1e-6)
    assert cli.main([*common, "--data", str(folder / "plain.npz"), "--mean", "0.5"]) == 2
    assert "go together" in capsys.readouterr().err
    assert cli.main([*common, "--data", str(folder / "boxed.npz"), *normalised]) == 2
    assert "keep one" in capsys.readouterr().err


def test_audit_takes_the_conversion_tolerances(channel_model, capsys, tmp_path):
    """`audit --atol/--rtol` reach the conversion check (recorded under `conversion`); < 0 exits 2."""
    path, folder = channel_model
    common = ["audit", str(path), "--data", str(folder / "plain.npz"), "--samples", "4", "--delta", "0.1",
              "--attacks", "pgd", "--quiet", "--out", str(tmp_path / "report")]
    assert cli.main([*common, "--atol", "-1"]) == 2
    assert "--atol and --rtol must be >= 0" in capsys.readouterr().err
    assert cli.main([*common, "--atol", "0.001", "--rtol", "0", "--json"]) == 0
    conversion = json.loads(capsys.readouterr().out)["conversion"]
    assert (conversion["atol"], conversion["rtol"]) == (0.001, 0.0) and conversion["passed"]
