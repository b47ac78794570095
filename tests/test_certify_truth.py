"""certify against the truth: closed forms on linear models, brute force on tiny 2-D ReLU nets,
random search + PGD on random small nets of every activation (method §2, §3.5, §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from scipy.optimize import linprog, minimize_scalar
from test_bounds import _attack, _project, _random_net
from test_cells import _tiny_2d_net

from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.onnx_io import load_model

N = helper.make_node
DUAL = {"inf": 1.0, "2": 2.0, "1": math.inf}  # order of the dual norm of each threat norm


def _load(tmp_path, model, name="model.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return convert_model(load_model(path))


def _linear_model(rng, inputs: int, classes: int):
    weight, bias = rng.normal(size=(classes, inputs)), rng.normal(size=classes)
    model = make_model([N("Gemm", ["x", "w", "b"], ["y"], transB=1)], [float_io("x", ["n", inputs])],
                       [float_io("y", ["n", classes])], [const("w", weight), const("b", bias)])
    return model, weight.astype(np.float32).astype(np.float64), bias.astype(np.float32).astype(np.float64)


def _exact_linear_risk(margins: np.ndarray, slopes: np.ndarray, delta: float, p: float) -> float:
    """R(delta) - clean for growth g_i(rho) = max_j (c_ij + L_ij rho), c_ij = m_ij - max_j m_ij (§2).

    p = inf: mean g_i(delta); p = 1: delta * max L; else the dual min over lambda of
    lambda delta^p + mean_i max_j (c_ij + (p - 1) lambda (L_ij / (lambda p))^(p / (p - 1))).
    """
    offsets = margins - margins.max(1, keepdims=True)
    if math.isinf(p):
        return float((offsets + delta * slopes).max(1).mean())
    if p == 1:
        return delta * float(slopes.max())

    def dual(log_lam: float) -> float:
        lam = math.exp(log_lam)
        inner = offsets + (p - 1) * lam * (slopes / (lam * p)) ** (p / (p - 1))
        return lam * delta**p + float(inner.max(1).mean())

    best = minimize_scalar(dual, bounds=(-30, 30), method="bounded", options={"xatol": 1e-10})
    return float(best.fun)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("p", [math.inf, 1.0, 2.0, 3.0])
def test_linear_model_certificate_is_the_exact_value(tmp_path, norm, p):
    rng = np.random.default_rng(3)
    model, weight, bias = _linear_model(rng, inputs=4, classes=5)
    converted = _load(tmp_path, model)
    x = rng.normal(size=(7, 4))
    y = rng.integers(0, 5, size=7)
    deltas = [0.05, 0.3]
    result = certify(converted, x, y, deltas, p=p, norm=norm, loss="margin", grid_points=48)
    logits = x @ weight.T + bias
    margins = logits - logits[np.arange(7), y][:, None]
    directions = weight[None, :, :] - weight[y][:, None, :]
    slopes = np.linalg.norm(directions, ord=DUAL[norm], axis=2)
    others = np.ones_like(margins, dtype=bool)
    others[np.arange(7), y] = False
    margins_o = np.where(others, margins, -np.inf)
    slopes_o = np.where(others, slopes, 0.0)
    clean = float(margins_o.max(1).mean())
    for delta, row in zip(deltas, result.results):
        truth = clean + _exact_linear_risk(margins_o, slopes_o, delta, p)
        assert row.clean_risk == pytest.approx(clean, abs=1e-9)
        assert row.certificate >= truth - 1e-9  # sound
        assert row.certificate == pytest.approx(truth, rel=2e-6, abs=2e-6)  # and exact (+ float32 rounding pad)
        assert row.realised_risk <= truth + 1e-9
        assert row.exact  # the realising distribution meets it (to the tolerance of §3.5)
        assert row.in_cell_mass == pytest.approx(1.0)  # a linear model is one cell
    assert result.exact_up_to_delta == max(deltas)


SPAN, GRID = 1.0, 401  # the box [-1, 1]^2 sampled on a 401 x 401 grid


def _discrete_truth(margins_at: np.ndarray, distances: np.ndarray, clean: np.ndarray, delta: float, p: float,
                    radii: np.ndarray) -> float:
    """A lower estimate of R(delta) - clean from grid points (each g_i(rho) sampled below the truth).

    p = inf: mean of the best grid point within delta. p < inf: the LP over masses w_ik of each
    sample at radius rho_k (the best grid point within rho_k), `sum_k w_ik = 1`,
    `mean_i sum_k w_ik rho_k^p <= delta^p` — a feasible distribution for every solution.
    """
    count = len(clean)
    growth = np.zeros((count, len(radii)))
    for i in range(count):
        order = np.argsort(distances[i])
        best = np.maximum.accumulate(margins_at[i][order])  # best margin within each sorted distance
        reached = np.searchsorted(distances[i][order], radii, side="right")  # points within each radius
        growth[i] = np.where(reached > 0, np.maximum(best[np.maximum(reached - 1, 0)], clean[i]), clean[i]) - clean[i]
    if math.isinf(p):
        return float(growth[:, np.searchsorted(radii, delta, side="right") - 1].mean())
    k = len(radii)
    cost = np.tile(radii**p, count) / count
    equality = np.kron(np.eye(count), np.ones((1, k)))
    solved = linprog(-growth.flatten() / count, A_ub=cost[None], b_ub=[delta**p], A_eq=equality,
                     b_eq=np.ones(count), bounds=(0, None), method="highs")
    assert solved.status == 0
    return float(-solved.fun)


@pytest.mark.parametrize("p,norm", [(math.inf, "inf"), (2.0, "2"), (2.0, "inf"), (1.0, "2")])
def test_tiny_relu_nets_truth_below_certificate(tmp_path, norm, p):
    rng = np.random.default_rng(11)
    axis = np.linspace(-SPAN, SPAN, GRID)
    plane = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    exact_seen = []
    for seed in range(2):
        converted = _load(tmp_path, _tiny_2d_net(seed), f"tiny{seed}.onnx")
        module = converted.logits_module.double()
        x = rng.uniform(-0.7, 0.7, size=(5, 2))
        with torch.no_grad():
            y = module(torch.from_numpy(x)).argmax(1).numpy()
            y[0] = (y[0] + 1) % 3  # one misclassified sample too
            logits = module(torch.from_numpy(plane)).numpy()
        deltas = [0.01, 0.05, 0.2]
        result = certify(converted, x, y, deltas, p=p, norm=norm, loss="margin", box=(-SPAN, SPAN), grid_points=32)
        order = {"inf": np.inf, "2": 2}[norm]
        distances = [np.linalg.norm(plane - x[i], ord=order, axis=1) for i in range(5)]
        margins_at = [np.delete(logits, y[i], 1).max(1) - logits[:, y[i]] for i in range(5)]
        with torch.no_grad():
            clean_logits = module(torch.from_numpy(x)).numpy()
        clean = np.array([np.delete(clean_logits[i], y[i]).max() - clean_logits[i, y[i]] for i in range(5)])
        radii = np.unique(np.concatenate([[0.0], np.geomspace(1e-3, 2.0 * SPAN * 2, 160), deltas]))
        spacing = 2 * SPAN / (GRID - 1)
        for delta, row in zip(deltas, result.results):
            truth = float(clean.mean()) + _discrete_truth(margins_at, distances, clean, delta, p, radii)
            assert truth <= row.certificate + 1e-9
            assert row.realised_risk <= row.certificate + 1e-9
            exact_seen.append(row.exact)
            if row.exact:  # then the certificate is the truth, to the plane grid's resolution
                lipschitz = float(np.abs(np.diff(logits.reshape(GRID, GRID, 3), axis=0)).max()) / spacing * 4
                assert row.certificate <= truth + lipschitz * spacing * 2 + 1e-6
    assert any(exact_seen) or p == 1.0  # the exactness check above did run


def _ce_attack(module, x: torch.Tensor, y: torch.Tensor, delta: float, norm: str, steps: int = 30) -> float:
    """Mean of the best cross-entropy found per point within delta (random starts, then PGD)."""
    radius = torch.full((len(x),), delta, dtype=x.dtype)
    generator = torch.Generator().manual_seed(0)

    def ce(points):
        return torch.nn.functional.cross_entropy(module(points), y, reduction="none")

    best = ce(x).detach()
    point = x.clone()
    for step in range(steps):
        if step < 5:
            point = _project(x, x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * delta, radius, norm,
                             (-1.0, 1.0))
        point.requires_grad_(True)
        (grad,) = torch.autograd.grad(ce(point).sum(), point)
        direction = grad.sign() if norm == "inf" else grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
        point = _project(x, point.detach() + direction * delta * 0.3, radius, norm, (-1.0, 1.0))
        best = torch.maximum(best, ce(point).detach())
    return float(best.mean())


@settings(max_examples=10)
@given(activation=st.sampled_from(["relu", "gelu", "silu", "leaky"]), seed=st.integers(0, 10_000),
       norm=st.sampled_from(["inf", "2"]), p=st.sampled_from([math.inf, 2.0, 1.0]),
       loss=st.sampled_from(["margin", "ce"]))
def test_random_nets_no_attack_beats_the_certificate(tmp_path_factory, activation, seed, norm, p, loss):
    converted = _load(tmp_path_factory.mktemp("net"), _random_net(activation, seed))
    module = converted.logits_module.double()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(-0.8, 0.8, size=(8, 6)))
    y = torch.from_numpy(rng.integers(0, 4, size=8))
    deltas = [0.02, 0.15]
    result = certify(converted, x, y, deltas, p=p, norm=norm, loss=loss, box=(-1.0, 1.0), grid_points=12)
    for delta, row in zip(deltas, result.results):
        # moving every point within delta is feasible for every p; random search + PGD on the margin
        found = _attack(module, x, y, torch.full((8,), delta, dtype=torch.float64), norm, (-1.0, 1.0), steps=30)
        attacked = float(found.mean()) if loss == "margin" else _ce_attack(module, x, y, delta, norm)
        assert row.clean_risk <= attacked + 1e-12
        assert attacked <= row.certificate + 1e-9
        assert row.realised_risk <= row.certificate + 1e-9
        assert row.certificate <= row.global_bound + 1e-12
        assert 0.0 <= row.certified_accuracy <= row.realised_accuracy + 1e-12


def test_stops_when_asked_and_delta_zero_alone(tmp_path):
    from verifier.deadline import Deadline, Stopped

    rng = np.random.default_rng(0)
    model, _, _ = _linear_model(rng, inputs=3, classes=3)
    converted = _load(tmp_path, model)
    x, y = rng.normal(size=(4, 3)), rng.integers(0, 3, size=4)
    asked = []
    with pytest.raises(Stopped):
        certify(converted, x, y, [0.1], deadline=Deadline.polling(lambda: asked.append(1) or len(asked) >= 3))
    assert len(asked) == 4  # the third poll ends the bound refinement; certify's own check right after stops
    (only,) = certify(converted, x, y, [0.0], p=2.0, norm="2", loss="margin").results
    assert only.certificate == pytest.approx(only.clean_risk, abs=2e-6)
    assert only.realised_risk == pytest.approx(only.clean_risk, abs=1e-12)


def _kinked_1d(kind: str):
    """1 input -> h -> a nonlinearity that is no activation site -> 2 logits (class 1 = 2a - 0.1)."""
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h"], transB=1)]
    if kind == "max3":  # max(h, 3h): slope 1 left of 0, 3 right of it
        nodes += [N("Mul", ["h", "three"], ["h3"]), N("Max", ["h", "h3"], ["a"])]
    else:  # h * h
        nodes += [N("Mul", ["h", "h"], ["a"])]
    nodes.append(N("Gemm", ["a", "wo", "bo"], ["y"], transB=1))
    inits = [const("w1", np.array([[1.0]])), const("b1", np.array([0.0])), const("three", 3.0),
             const("wo", np.array([[0.0], [2.0]])), const("bo", np.array([0.0, -0.1]))]
    used = {t for n in nodes for t in n.input}
    return make_model(nodes, [float_io("x", ["n", 1])], [float_io("y", ["n", 2])], [i for i in inits if i.name in used])


@pytest.mark.parametrize("kind,x0", [("max3", -0.5), ("square", 0.3)])
def test_nonlinear_ops_outside_sites_are_not_taken_for_cells(tmp_path, kind, x0):
    """A kink or curvature the site finder does not cover must not be extrapolated linearly."""
    converted = _load(tmp_path, _kinked_1d(kind))
    assert not converted.piecewise_linear and converted.uncovered_nonlinear
    module = converted.logits_module.double()
    x, y = np.array([[x0]]), np.array([0])
    grid = torch.linspace(x0 - 1.0, x0 + 1.0, 4001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        logits = module(grid)
    truth = float((logits[:, 1] - logits[:, 0]).max())  # p = inf, one sample, delta = 1, no box
    (row,) = certify(converted, x, y, [1.0], p=math.inf, norm="inf", loss="margin").results
    assert row.certificate >= truth - 1e-9
    assert row.realised_risk <= row.certificate
