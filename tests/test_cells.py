"""Cells: affine maps, exact radii, in-cell growth and flip distances, checked by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model, shipped_data, shipped_model
from onnx import helper

from verifier import errors
from verifier.cells import cell_analysis
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.losses import margins
from verifier.onnx_io import load_model

N = helper.make_node
ORDERS = {"inf": math.inf, "2": 2.0, "1": 1.0}


def _random_in_ball(center: torch.Tensor, radius: torch.Tensor, norm: str, generator) -> torch.Tensor:
    """Points x + d with ||d||_norm <= radius (per sample)."""
    d = torch.randn(center.flatten(1).shape, generator=generator, dtype=center.dtype)
    d = d / torch.linalg.vector_norm(d, ORDERS[norm], dim=1, keepdim=True)
    scale = radius.unsqueeze(1) * torch.rand(len(d), 1, generator=generator, dtype=center.dtype)
    return center + (d * scale).reshape(center.shape)


def _shipped(name: str, count: int, noise: float = 0.0):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=count)
    x = torch.from_numpy(samples.x).double()
    if noise:
        x = x + noise * torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return converted, x, torch.from_numpy(samples.y)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("name,noise", [("mlp_relu", 0.0), ("cnn", 0.01)])
def test_network_is_affine_inside_the_cell(name, noise, norm):
    converted, x, y = _shipped(name, 40, noise)
    cells = cell_analysis(converted, x, y, norm, device="cpu")
    assert (cells.radius > 0).float().mean() > 0.8
    module = converted.logits_module.double()
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        moved = _random_in_ball(x, cells.radius * (1 - 1e-9), norm, generator)
        predicted = torch.einsum("ncd,nd->nc", cells.jacobian, moved.flatten(1)) + cells.offset
        assert torch.allclose(module(moved), predicted, atol=1e-9)


def test_just_past_the_radius_the_pattern_changes():
    """ReLU MLP, r=2, no box: the nearest unit flips just beyond r_i and nothing flips just inside."""
    converted, x, y = _shipped("mlp_relu", 12)
    cells = cell_analysis(converted, x, y, "2", device="cpu")
    probe = converted.probe_module([s.index for s in converted.logit_sites]).double()

    def pre_activations(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([probe(v)[1][s.index][0].flatten(1) for s in converted.logit_sites], 1)

    def signs(v: torch.Tensor) -> torch.Tensor:
        return torch.sign(pre_activations(v))

    for i in range(len(x)):
        point = x[i:i + 1]
        values = pre_activations(point)[0]
        grads = torch.autograd.functional.jacobian(lambda v: pre_activations(v)[0], point)[:, 0]
        distances = values.abs() / grads.norm(dim=1)
        unit = int(distances.argmin())
        assert float(distances[unit].detach()) == pytest.approx(float(cells.radius[i]), rel=1e-9)
        step = -torch.sign(values[unit]) * grads[unit] / grads[unit].norm() * cells.radius[i]
        assert torch.equal(signs(point + step * (1 - 1e-6)), signs(point))
        assert signs(point + step * (1 + 1e-6))[0, unit] != signs(point)[0, unit]


def _tiny_2d_net(seed: int):
    """2 inputs -> Gemm -> LeakyReLU -> Gemm -> Clip[0, 1.5] -> Gemm -> Abs -> Gemm -> 3 logits."""
    rng = np.random.default_rng(seed)
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h1"], transB=1), N("LeakyRelu", ["h1"], ["a1"], alpha=0.1),
             N("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1), N("Clip", ["h2", "lo", "hi"], ["a2"]),
             N("Gemm", ["a2", "w3", "b3"], ["h3"], transB=1), N("Abs", ["h3"], ["a3"]),
             N("Gemm", ["a3", "w4", "b4"], ["y"], transB=1)]
    inits = [const("w1", rng.normal(size=(6, 2))), const("b1", rng.normal(size=6) * 0.5),
             const("w2", rng.normal(size=(5, 6)) * 0.7), const("b2", rng.normal(size=5) * 0.5),
             const("lo", 0.0), const("hi", 1.5),
             const("w3", rng.normal(size=(4, 5))), const("b3", rng.normal(size=4) * 0.3),
             const("w4", rng.normal(size=(3, 4))), const("b4", rng.normal(size=3) * 0.3)]
    return make_model(nodes, [float_io("x", ["n", 2])], [float_io("y", ["n", 3])], inits)


GRID = 601
SPAN = 1.5


@pytest.fixture(scope="module")
def tiny_nets(tmp_path_factory):
    nets = []
    for seed in range(3):
        path = tmp_path_factory.mktemp("tiny") / f"net{seed}.onnx"
        path.write_bytes(_tiny_2d_net(seed).SerializeToString())
        converted = convert_model(load_model(path))
        axis = torch.linspace(-SPAN, SPAN, GRID, dtype=torch.float64)
        grid = torch.cartesian_prod(axis, axis)
        probe = converted.probe_module([s.index for s in converted.logit_sites]).double()
        logits, probes = probe(grid)
        pattern = torch.cat([torch.sign(probes[s.index][0]) if s.kind != "clip" else
                             torch.bucketize(probes[s.index][0], torch.tensor([0.0, 1.5], dtype=torch.float64))
                             for s in converted.logit_sites], 1)
        nets.append((converted, grid, pattern, logits))
    return nets


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("box", [None, (-1.0, 1.0)])
def test_tiny_nets_radius_growth_flip_match_brute_force(tiny_nets, norm, box):
    spacing = 2 * SPAN / (GRID - 1)
    tolerance = 2.5 * spacing  # grid resolution in any of the three norms
    rng = np.random.default_rng(5)
    for converted, grid, pattern, logits in tiny_nets:
        x = torch.from_numpy(rng.uniform(-0.8, 0.8, size=(6, 2)))
        y = torch.from_numpy(rng.integers(0, 3, size=6))
        cells = cell_analysis(converted, x, y, norm, box=box, device="cpu")
        inside = torch.ones(len(grid), dtype=torch.bool)
        if box is not None:
            inside = ((grid >= box[0]) & (grid <= box[1])).all(1)
        for i in range(len(x)):
            distance = torch.linalg.vector_norm(grid - x[i], ORDERS[norm], dim=1)
            nearest = int(distance.argmin())
            different = (pattern != pattern[nearest]).any(1) & inside
            brute_radius = float(distance[different].min()) if different.any() else math.inf
            assert float(cells.radius[i]) <= brute_radius + tolerance
            assert float(cells.radius[i]) >= brute_radius - tolerance
            margin = margins(logits, y[i].expand(len(grid))).masked_fill(
                torch.nn.functional.one_hot(y[i], 3).bool(), -math.inf).max(1).values
            base = float(cells.margins[i].masked_fill(torch.nn.functional.one_hot(y[i], 3).bool(), -math.inf).max())
            for fraction in (0.3, 0.9):
                s = fraction * float(cells.radius[i])
                if not math.isfinite(s) or s < 4 * spacing:
                    continue
                in_ball = (distance <= s) & inside
                brute_growth = float(margin[in_ball].max()) - base
                growth = float(cells.margin_growth(torch.full((len(x), 1), s, dtype=torch.float64))[i, 0])
                assert brute_growth <= growth + 1e-9  # the LP is an exact sup: never below a feasible point
                assert growth <= brute_growth + 10 * tolerance
            flip = float(cells.flip_distance()[i])
            if base < 0 and flip < float(cells.radius[i]) - tolerance:
                wrong = (margin >= 0) & inside
                assert abs(float(distance[wrong].min()) - flip) <= tolerance


def test_growth_is_zero_at_zero_and_monotone():
    converted, x, y = _shipped("mlp_relu", 10)
    cells = cell_analysis(converted, x, y, "inf", box=(0.0, 1.0), device="cpu")
    radii = torch.tensor([0.0, 1e-4, 5e-4, 1e-3], dtype=torch.float64)
    growth = cells.margin_growth(radii)
    assert torch.all(growth[:, 0] == 0)
    assert torch.all(growth[:, 1:] >= growth[:, :-1])
    assert torch.all(cells.certified_radius() <= cells.radius)


def test_smooth_model_is_refused():
    converted, x, y = _shipped("mlp_gelu", 2)
    with pytest.raises(errors.VerifierError, match="piecewise-linear"):
        cell_analysis(converted, x, y, "2")


def test_samples_outside_the_box_are_refused():
    converted, x, y = _shipped("mlp_relu", 3)
    with pytest.raises(errors.VerifierError, match="outside the box"):
        cell_analysis(converted, x + 2.0, y, "2", box=(0.0, 1.0))


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("boxed", [True, False])
def test_pruned_distance_to_kinks_equals_the_full_minimum(monkeypatch, norm, boxed):
    """The exact distance is computed only for constraints whose box-free lower bound could win:
    the minimum must be the one over every constraint."""
    from verifier import cells
    from verifier.geometry import radius_to_reach

    generator = torch.Generator().manual_seed(3)
    kappa = torch.randn(4, 300, dtype=torch.float64, generator=generator)
    grad = torch.randn(4, 300, 12, dtype=torch.float64, generator=generator)
    grad[:, :5] = 0.0  # constant constraints never bind
    kappa[0, 7] = 0.0  # on a kink: distance 0
    centre = torch.rand(4, 12, dtype=torch.float64, generator=generator)
    lower, upper = (-centre, 1.0 - centre) if boxed else (torch.full_like(centre, -math.inf),
                                                          torch.full_like(centre, math.inf))
    toward = torch.where((kappa == 0).unsqueeze(-1), grad, -torch.sign(kappa).unsqueeze(-1) * grad)
    full = radius_to_reach(toward, lower[:, None], upper[:, None], kappa.abs(), norm)
    full = torch.where((grad == 0).all(-1), math.inf, full).min(-1).values
    monkeypatch.setattr(cells, "_FIRST_CANDIDATES", 1)  # forces the widening loop
    assert torch.equal(cells._distance_to_kinks(kappa, grad, lower, upper, norm), full)
    assert float(full[0]) == 0.0


@pytest.mark.parametrize("seconds, stops", [(5.0, True), (1e9, False)])
def test_cells_stop_after_one_pass_when_the_passes_left_cannot_finish(seconds, stops):
    from test_deadline import Ticks  # each unit pass 'takes' one second

    from verifier.deadline import Deadline, Stopped

    loaded = load_model(shipped_model("cnn"))
    model = convert_model(loaded)
    samples = load_samples(shipped_data("cnn"), loaded.info.data_input, limit=2)
    clock = Ticks()
    deadline = Deadline.after(seconds, clock=clock)
    # a small memory limit: many passes over the units (the second one is timed, one tick)
    run = lambda: cell_analysis(model, samples.x, samples.y, "inf", box=(0.0, 1.0), deadline=deadline,  # noqa: E731
                                memory_limit_bytes=2 << 20)
    if stops:
        with pytest.raises(Stopped, match="would not finish within the time limit"):
            run()
        assert clock.now < 16  # right after the second pass, not at the limit's end of many passes
    else:  # the same cells as with no limit at all
        reference = cell_analysis(model, samples.x, samples.y, "inf", box=(0.0, 1.0), memory_limit_bytes=2 << 20)
        assert torch.equal(run().radius, reference.radius)
