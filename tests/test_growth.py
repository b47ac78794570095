"""Growth curves: never below the brute-force growth of tiny 2-D nets, for every loss and route."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_cells import _tiny_2d_net

from verifier.bounds.global_lipschitz import global_lipschitz
from verifier.bounds.network import BoundNetwork
from verifier.cells import cell_analysis
from verifier.certify.aggregate import grid
from verifier.certify.growth import collect_evidence, growth_curves
from verifier.convert import convert_model
from verifier.convert.normalize import normalize_model
from verifier.losses import loss_values
from verifier.onnx_io import load_model

ORDERS = {"inf": math.inf, "2": 2.0, "1": 1.0}


@pytest.mark.parametrize("loss", ["margin", "ce", "zero_one"])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_growth_dominates_brute_force(tmp_path, loss, norm):
    path = tmp_path / "net.onnx"
    path.write_bytes(_tiny_2d_net(1).SerializeToString())
    loaded = load_model(path)
    converted = convert_model(loaded)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-0.7, 0.7, size=(5, 2)))
    y = torch.from_numpy(rng.integers(0, 3, size=5))
    module = converted.logits_module.double()
    logits = module(x).detach()
    box = (-1.0, 1.0)
    slope = global_lipschitz(normalize_model(loaded.proto), norm).loss_constant(loss)
    cells = cell_analysis(converted, x, y, norm, box=box, device="cpu")
    radii = grid(1.5, count=10)
    evidence = collect_evidence(BoundNetwork.from_model(converted), x, y, logits, norm, radii, box, cells)
    result = growth_curves(evidence, loss, slope)
    values = result.curves.values
    assert torch.all(values[:, 1:] >= values[:, :-1])
    axis = torch.linspace(-1, 1, 401, dtype=torch.float64)
    plane = torch.cartesian_prod(axis, axis)
    for i in range(len(x)):
        distance = torch.linalg.vector_norm(plane - x[i], ORDERS[norm], dim=1)
        losses = loss_values(module(plane), y[i].expand(len(plane)), loss).detach()
        for k, radius in enumerate(radii.tolist()):
            inside = distance <= radius
            if not inside.any():
                continue
            brute = float(losses[inside].max()) - float(result.clean_loss[i])
            assert float(values[i, k]) >= brute - 1e-9
    assert set(result.winner.unique().tolist()) <= {0, 1, 2, 3}


def test_samples_per_pass_counts_the_backward_passes_and_their_rows_split_exactly(tmp_path, monkeypatch):
    """A propagation's samples are sized to the interval pass and to the slope pass of one objective
    row (its widest tensor: a MaxPool's windows per tap); the margin and slope passes take their rows
    a few at a time, which changes no bound."""
    from conftest import const, float_io, make_model
    from onnx import helper

    from verifier.bounds import propagate, slopes
    from verifier.bounds.margins import margin_bounds
    from verifier.certify.growth import samples_per_pass

    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    rng = np.random.default_rng(3)
    model = make_model(nodes, [float_io("x", ["n", 1, 8, 8])], [float_io("y", ["n", 7])],
                       [const("K", rng.normal(size=(4, 1, 3, 3))), const("W", rng.normal(size=(7, 256)))])
    path = tmp_path / "pool.onnx"
    path.write_bytes(model.SerializeToString())
    converted = convert_model(load_model(path))
    network = BoundNetwork.from_model(converted)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    sizes = network.value_sizes(x)
    assert network.widest_backward(sizes) == 4 * 8 * 8 * 9  # the pool's 256 windows x 9 taps
    per_sample = (sum(sizes.values()) * 10 + 4 * 8 * 8 * 9 * 6) * 8
    assert samples_per_pass(network, x, 1 << 26) == (1 << 25) // per_sample
    assert samples_per_pass(network, x, 1 << 10) == 1  # never fewer than one sample
    y = converted.logits(x.float()).argmax(1)
    whole = slopes.slope_bounds(converted, x, y, 0.05, "inf", (0.0, 1.0)).per_class
    margins = margin_bounds(converted, x, y, radius=0.05, norm="inf", box=(0.0, 1.0)).upper
    monkeypatch.setattr(propagate, "ROW_ELEMENTS", 1)  # one objective row at a time
    one_by_one = slopes.slope_bounds(converted, x, y, 0.05, "inf", (0.0, 1.0)).per_class
    assert torch.isfinite(whole).all() and torch.equal(whole, one_by_one)
    row_by_row = margin_bounds(converted, x, y, radius=0.05, norm="inf", box=(0.0, 1.0)).upper
    assert torch.isfinite(margins).all()
    torch.testing.assert_close(row_by_row, margins, rtol=0, atol=1e-12)


def test_widest_backward_counts_a_convolutions_unfolded_input(tmp_path):
    """A float64 CPU convolution's transpose unfolds its rows (C_in x taps per output position, the
    tumor-vgg16 audit's 6 GB): the passes are sized to that, not to the widest node value."""
    from conftest import const, float_io, make_model
    from onnx import helper

    from verifier.certify.growth import samples_per_pass

    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    rng = np.random.default_rng(4)
    model = make_model(nodes, [float_io("x", ["n", 4, 6, 6])], [float_io("y", ["n", 3])],
                       [const("K", rng.normal(size=(2, 4, 3, 3))), const("W", rng.normal(size=(3, 72)))])
    path = tmp_path / "conv.onnx"
    path.write_bytes(model.SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    sizes = network.value_sizes(x)
    assert max(sizes.values()) == 4 * 36  # the input
    assert network.widest_backward(sizes) == 2 * 36 * (4 * 9 // 2)  # 36 positions x 4 channels x 9 taps
    per_sample = (sum(sizes.values()) * 10 + 2 * 36 * 18 * 6) * 8
    assert samples_per_pass(network, x, 1 << 24) == (1 << 23) // per_sample


def test_large_passes_trim_the_heaps_after_each_propagation(tmp_path, monkeypatch):
    """Passes above `_TRIM_AFTER_BYTES` hand the heaps' free pages back after each propagation (one
    cheap and one tight pass per grid radius, and the whole domain's); smaller ones never do."""
    from verifier.certify import growth

    path = tmp_path / "net.onnx"
    path.write_bytes(_tiny_2d_net(1).SerializeToString())
    converted = convert_model(load_model(path))
    x = torch.from_numpy(np.random.default_rng(1).uniform(-0.7, 0.7, size=(4, 2)))
    y = torch.tensor([0, 1, 2, 0])
    logits = converted.logits_module.double()(x).detach()
    network, radii = BoundNetwork.from_model(converted), grid(1.0, count=5)
    calls = []
    monkeypatch.setattr(growth, "trim_heaps", lambda: calls.append(1))
    collect_evidence(network, x, y, logits, "inf", radii, (-1.0, 1.0))
    assert not calls  # a few kilobytes a pass
    monkeypatch.setattr(growth, "_TRIM_AFTER_BYTES", 1)
    collect_evidence(network, x, y, logits, "inf", radii, (-1.0, 1.0))
    assert len(calls) == 2 * len(radii)  # (points - 1 radii + the whole domain) x (cheap, tight)


def test_a_bound_pass_over_the_memory_limit_is_skipped_with_a_note(tmp_path):
    """One sample is the smallest pass: where even it needs more than half the limit, no linear bounds
    are computed (as without a network) and the evidence says why; above that the bounds are there."""
    path = tmp_path / "net.onnx"
    path.write_bytes(_tiny_2d_net(1).SerializeToString())
    converted = convert_model(load_model(path))
    x = torch.from_numpy(np.random.default_rng(2).uniform(-0.7, 0.7, size=(3, 2)))
    y = torch.tensor([0, 1, 2])
    logits = converted.logits_module.double()(x).detach()
    network, radii = BoundNetwork.from_model(converted), grid(1.0, count=4)
    from verifier.certify.growth import _bytes_per_sample

    needed = _bytes_per_sample(network, x)
    starved = collect_evidence(network, x, y, logits, "inf", radii, (-1.0, 1.0), memory_limit_bytes=2 * needed - 2)
    assert starved.linear is None and starved.slopes is None
    assert any(note.startswith("memory limit: one sample's bound pass needs") for note in starved.notes)
    fitting = collect_evidence(network, x, y, logits, "inf", radii, (-1.0, 1.0), memory_limit_bytes=2 * needed)
    assert fitting.linear is not None and torch.isfinite(fitting.linear[:, 1:]).any() and not fitting.notes


def test_certify_without_room_for_one_bound_pass_falls_back_and_says_so(tmp_path):
    from verifier.certify.certificate import certify

    path = tmp_path / "net.onnx"
    path.write_bytes(_tiny_2d_net(1).SerializeToString())
    converted = convert_model(load_model(path))
    x = torch.from_numpy(np.random.default_rng(5).uniform(-0.7, 0.7, size=(6, 2))).float()
    y = converted.logits(x).argmax(1)
    roomy = certify(converted, x, y, [0.05], box=(-1.0, 1.0), exact="off")
    tight = certify(converted, x, y, [0.05], box=(-1.0, 1.0), exact="off", memory_limit_bytes=64)
    assert any(f.startswith("memory limit: one sample's bound pass") for f in tight.fallbacks)
    assert not any(f.startswith("memory limit") for f in roomy.fallbacks)
    for result in (roomy, tight):  # sound either way: at least the certificate's own distribution
        assert math.isfinite(result.results[0].certificate)
        assert result.results[0].certificate >= result.results[0].realised_risk - 1e-12
    assert tight.results[0].certificate >= roomy.results[0].certificate - 1e-12
