"""Clean forward passes and onnxruntime replays run in chunks of rows sized from the memory limit
(`verifier.resources`): the row counts follow from the limit and the shapes, and chunking changes no
value."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier.attacks import _target
from verifier.attacks.replay import Replayer, clean_numbers, measure
from verifier.attacks.result import Distribution
from verifier.convert import convert_model
from verifier.deadline import NEVER
from verifier.jacobian import autograd_bytes, chunked_logits, forward_bytes
from verifier.losses import loss_values
from verifier.onnx_io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 3),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)).to(torch.float64).eval()


class Rows(torch.nn.Module):
    """Records the rows of every call of the wrapped module."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(x))
        return self.inner(x)


def test_forward_bytes_add_the_largest_unfolded_convolution_input():
    net, row = _conv_net(), torch.rand(1, 2, 6, 6, dtype=torch.float64)
    # conv 1: 2 channels x 9 taps x 6 x 6 outputs; conv 2: 3 x 9 x 4 x 4 (float64)
    assert forward_bytes(net, row) == autograd_bytes(net, row) + max(2 * 9 * 36, 3 * 9 * 16) * 8
    mlp = torch.nn.Sequential(torch.nn.Linear(7, 3)).to(torch.float64)
    assert forward_bytes(mlp, torch.rand(1, 7, dtype=torch.float64)) == autograd_bytes(mlp, torch.rand(1, 7, dtype=torch.float64))


def test_the_clean_forward_pass_runs_in_the_rows_that_fit_and_changes_no_value():
    net = _conv_net()
    x = torch.rand(11, 2, 6, 6, dtype=torch.float64)
    per_row = forward_bytes(net, x[:1])
    spy = Rows(net)
    chunked = chunked_logits(spy, x, 3 * per_row + per_row // 2)
    assert spy.seen[1:] == [3, 3, 3, 2]  # after the one-row measurement: 11 rows, 3 at a time
    with torch.no_grad():  # a batch of 3 and one of 11 may take different convolution kernels on some CPUs
        torch.testing.assert_close(chunked, net(x), rtol=1e-13, atol=1e-15)
    spy.seen.clear()
    one_at_a_time = chunked_logits(spy, x, 1)
    assert spy.seen[1:] == [1] * 11  # at least one row
    torch.testing.assert_close(one_at_a_time, chunked, rtol=1e-13, atol=1e-15)  # a 1-row pass: another kernel
    spy.seen.clear()
    chunked_logits(spy, x, 10**12, fixed_batch=4)
    assert spy.seen[1:] == [4, 4, 3]  # a kept fixed batch sets the chunks


@pytest.fixture(scope="module")
def cnn():
    loaded = load_model(shipped_model("cnn"))
    data = np.load(shipped_data("cnn"))
    return loaded, convert_model(loaded), data["x"][:10], data["y"][:10]


def test_a_replay_in_chunks_of_rows_equals_the_one_shot_replay(cnn):
    loaded, model, x, _ = cnn
    atoms = torch.as_tensor(x) + 0.01
    one_shot = Replayer(loaded, model, torch.device("cpu"), rows=16).logits(atoms)
    chunked = Replayer(loaded, model, torch.device("cpu"), rows=4).logits(atoms)  # 4 + 4 + 2 (padded)
    assert one_shot.shape == (10, 10)
    assert torch.equal(chunked, one_shot)
    assert torch.equal(Replayer(loaded, model, torch.device("cpu"), rows=4).logits(atoms), chunked)  # no state kept


def test_atoms_left_at_their_samples_cost_no_pass_and_keep_their_values(cnn, monkeypatch):
    """A distribution of 10 atoms of which 7 are their samples: 3 rows replayed (one pass of the
    target's row count), and the same numbers as replaying all 10."""
    loaded, model, x, y = cnn
    target = _target(model, x, y, 2.0, "inf", "ce", (0.0, 1.0), torch.device("cpu"), NEVER)
    source = torch.arange(10)
    atoms = target.x.clone()
    atoms[[1, 4, 8]] += 0.02
    dist = Distribution(atoms, torch.full((10,), 0.1, dtype=torch.float64), source, 1, ())
    full = Replayer(loaded, model, torch.device("cpu"), target.rows_per_pass)
    expected_ort, expected_torch = full.logits(atoms), target.logits(atoms)
    replayer = Replayer(loaded, model, torch.device("cpu"), target.rows_per_pass)
    clean = clean_numbers(target, replayer)
    seen = []
    real = Replayer.logits
    monkeypatch.setattr(Replayer, "logits", lambda self, a: seen.append(len(a)) or real(self, a))
    result = measure("pgd", 0.1, dist, target, replayer, clean)
    assert seen == [3]  # the samples' own onnxruntime logits were computed once, by clean_numbers
    labels = target.y
    assert result.risk == pytest.approx(float(loss_values(expected_ort, labels, "ce").mean()), rel=1e-12, abs=1e-12)
    assert result.robust_accuracy == float((loss_values(expected_ort, labels, "margin") < 0).double().mean())
    torch.testing.assert_close(target.clean_logits[[0, 2]], expected_torch[[0, 2]], rtol=0, atol=0)
