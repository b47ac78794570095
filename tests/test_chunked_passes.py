"""Clean forward passes and onnxruntime replays run in chunks of rows sized from the memory limit
(`verifier.resources`): the row counts follow from the limit and the shapes, and chunking changes no
value."""

from __future__ import annotations


import pytest
import torch

from verifier.jacobian import autograd_bytes, chunked_logits, forward_bytes

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
    with torch.no_grad():
        assert torch.equal(chunked, net(x))
    spy.seen.clear()
    one_at_a_time = chunked_logits(spy, x, 1)
    assert spy.seen[1:] == [1] * 11  # at least one row
    torch.testing.assert_close(one_at_a_time, chunked, rtol=1e-13, atol=1e-15)  # a 1-row pass: another kernel
    spy.seen.clear()
    chunked_logits(spy, x, 10**12, fixed_batch=4)
    assert spy.seen[1:] == [4, 4, 3]  # a kept fixed batch sets the chunks
