"""The exact mode (verifier.exact, certify.milp_route): MILP optimum vs brute force, attacks and CROWN;
certificates with MILP points vs without, and `exact` only when the realising distribution meets them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from onnx import helper, numpy_helper
from test_bounds import _attack, _random_net

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.certify.aggregate import GrowthCurves, used_points
from verifier.certify.certificate import certify
from verifier.certify.exactness import EXACT_TOLERANCE, is_exact
from verifier.certify.milp_route import ExactSettings
from verifier.convert import convert_model
from verifier.exact.encode import NotEncodable, encode_network
from verifier.exact.margins import milp_margins
from verifier.exact.milp import PAD
from verifier.onnx_io import load_model

N = helper.make_node
BOX = (-1.5, 1.5)


def _load(tmp_path, model, name):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return convert_model(load_model(path))


def _tiny_relu_2d(seed: int):
    """2 inputs -> Gemm -> ReLU -> Gemm -> LeakyReLU(0.2) -> Gemm -> 3 logits."""
    rng = np.random.default_rng(seed)
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h1"], transB=1), N("Relu", ["h1"], ["a1"]),
             N("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1), N("LeakyRelu", ["h2"], ["a2"], alpha=0.2),
             N("Gemm", ["a2", "w3", "b3"], ["y"], transB=1)]
    inits = [const("w1", rng.normal(size=(8, 2))), const("b1", rng.normal(size=8) * 0.5),
             const("w2", rng.normal(size=(6, 8)) * 0.6), const("b2", rng.normal(size=6) * 0.3),
             const("w3", rng.normal(size=(3, 6))), const("b3", rng.normal(size=3) * 0.3)]
    return make_model(nodes, [float_io("x", ["n", 2])], [float_io("y", ["n", 3])], inits)


def _grid_worst(module, center: np.ndarray, label: int, radius: float, norm: str, count: int = 401):
    """Brute force: the worst margin on a dense grid of the ball ∩ box, and the grid spacing."""
    low, high = np.maximum(center - radius, BOX[0]), np.minimum(center + radius, BOX[1])
    axes = [np.linspace(low[k], high[k], count) for k in range(2)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    if norm == "1":
        points = points[np.abs(points - center).sum(1) <= radius]
    with torch.no_grad():
        logits = module(torch.from_numpy(points)).numpy()
    worst = np.delete(logits, label, 1).max(1) - logits[:, label]
    return float(worst.max()), float(max(high - low) / (count - 1))


@pytest.mark.parametrize("norm", ["inf", "1"])
def test_milp_optimum_is_the_brute_force_maximum(tmp_path, norm):
    for seed in range(2):
        converted = _load(tmp_path, _tiny_relu_2d(seed), f"tiny{seed}.onnx")
        module = converted.logits_module.double()
        network = BoundNetwork.from_model(converted)
        rng = np.random.default_rng(seed)
        x = torch.from_numpy(rng.uniform(-0.6, 0.6, size=(3, 2)))
        with torch.no_grad():
            y = module(x).argmax(1)
        model = _tiny_relu_2d(seed)
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        # ℓ∞ -> ℓ∞ Lipschitz bound of every margin (activations are 1-Lipschitz): the grid's resolution
        lipschitz = 2 * np.prod([np.abs(weights[w]).sum(1).max() for w in ("w1", "w2", "w3")])
        for radius in (0.1, 0.5, 1.2):
            solutions = milp_margins(network, x, y, radius, norm, BOX)
            linear = margin_bounds(network, x, y, radius, norm, BOX).worst_margin
            for i, solution in enumerate(solutions):
                assert solution.optimal
                exact = float(solution.upper.max())
                truth, spacing = _grid_worst(module, x[i].numpy(), int(y[i]), radius, norm)
                assert truth <= exact + 1e-7  # the MILP bound is an upper bound
                assert exact <= truth + lipschitz * 2 * spacing  # and the grid comes within its resolution of it
                assert exact <= float(linear[i]) + 1e-9  # never above the linear (CROWN) bound
                assert solution.best <= exact + 1e-9


def random_relu_case(tmp_path, count: int):
    """The seeded random ReLU net of test_bounds as (float64 module, bound network, x, its labels),
    `count` inputs uniform in [-1, 1]^6 (shared with test_relu_bab)."""
    converted = _load(tmp_path, _random_net("relu", seed=3), "random.onnx")
    module = converted.logits_module.double()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, size=(count, 6)))
    with torch.no_grad():
        y = module(x).argmax(1)
    return module, BoundNetwork.from_model(converted), x, y


def test_milp_on_random_nets_between_attack_and_crown(tmp_path):
    module, network, x, y = random_relu_case(tmp_path, 4)
    for norm, radius in (("inf", 0.3), ("1", 0.8)):
        solutions = milp_margins(network, x, y, radius, norm, BOX)
        attack = _attack(module, x, y, torch.full((4,), radius, dtype=torch.float64), norm, BOX, steps=40).detach()
        linear = margin_bounds(network, x, y, radius, norm, BOX).worst_margin
        for i, solution in enumerate(solutions):
            exact = float(solution.upper.max())
            assert float(attack[i]) <= exact + 1e-7
            assert exact <= float(linear[i]) + 1e-9
            # the maximiser is a real point of the set, and the network there attains the optimum
            point = torch.from_numpy(solution.point)[None]
            assert float((point - x[i]).abs().max() if norm == "inf" else (point - x[i]).abs().sum()) <= radius + 1e-6
            with torch.no_grad():
                logits = module(point)[0]
            value = float(torch.cat([logits[:int(y[i])], logits[int(y[i]) + 1:]]).max() - logits[int(y[i])])
            assert exact - 3 * PAD * (1 + abs(exact)) <= value <= exact  # the pad is the only difference


def test_unencodable_nets_and_norms_leave_the_route_off(tmp_path):
    gelu = _load(tmp_path, _random_net("gelu", seed=1), "gelu.onnx")
    with pytest.raises(NotEncodable):
        encode_network(BoundNetwork.from_model(gelu), (6,))
    relu = _load(tmp_path, _tiny_relu_2d(0), "tiny.onnx")
    x = np.array([[0.1, -0.2]])
    y = relu.logits_module.double()(torch.from_numpy(x)).argmax(1).numpy()
    result = certify(relu, x, y, [0.1], p=2, norm="2", loss="margin", box=BOX, exact="on")
    assert not result.exact_mode.active and "polyhedral" in result.exact_mode.reason
    x = np.random.default_rng(2).uniform(-0.5, 0.5, size=(3, 6))
    y = gelu.logits_module.double()(torch.from_numpy(x)).argmax(1).numpy()
    result = certify(gelu, x, y, [0.3], p=math.inf, norm="1", loss="margin", box=BOX, exact="on")
    assert not result.exact_mode.active and "MILP" in result.exact_mode.reason  # ℓ1 and no MILP form
    # ℓ∞ on 6 inputs: input splitting takes the MILP's place for the smooth net, and only tightens
    off = certify(gelu, x, y, [0.3], p=math.inf, norm="inf", loss="margin", box=BOX, grid_points=8, exact="off")
    split = certify(gelu, x, y, [0.3], p=math.inf, norm="inf", loss="margin", box=BOX, grid_points=8, exact="on")
    assert split.exact_mode.active and split.exact_mode.solver == "split" and split.exact_mode.solved > 0
    assert split.results[0].realised_risk <= split.results[0].certificate <= off.results[0].certificate + 1e-12


def tiny_certify_case(tmp_path):
    """The 2-D tiny ReLU net (converted, float64 module) and 4 seeded inputs in [-0.6, 0.6]^2 with
    its own labels (shared with test_relu_bab)."""
    converted = _load(tmp_path, _tiny_relu_2d(1), "tiny1.onnx")
    module = converted.logits_module.double()
    x = np.random.default_rng(5).uniform(-0.6, 0.6, size=(4, 2))
    with torch.no_grad():
        y = module(torch.from_numpy(x)).argmax(1).numpy()
    return converted, module, x, y


@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_exact_points_tighten_the_certificate_and_stay_sound(tmp_path, p):
    converted, module, x, y = tiny_certify_case(tmp_path)
    deltas = [0.05, 0.3, 0.8]
    off = certify(converted, x, y, deltas, p=p, norm="inf", loss="margin", box=BOX, grid_points=12, exact="off")
    on = certify(converted, x, y, deltas, p=p, norm="inf", loss="margin", box=BOX, grid_points=12,
                 exact=ExactSettings("on", rounds=3))
    assert on.exact_mode.active and on.exact_mode.solved > 0 and on.exact_mode.optimal == on.exact_mode.solved
    tx = torch.from_numpy(x)
    for a, b, delta in zip(off.results, on.results, deltas):
        assert b.certificate <= a.certificate + 1e-12
        assert b.realised_risk <= b.certificate + 1e-9
        if math.isinf(p):  # every atom may move delta: PGD per sample is a feasible distribution
            attack = _attack(module, tx, torch.from_numpy(y), torch.full((4,), delta, dtype=torch.float64), "inf",
                             BOX, steps=40)
            assert float(attack.mean()) <= b.certificate + 1e-9
        for row in (a, b):  # `exact` exactly when the realising distribution meets the certificate
            met = row.certificate - row.realised_risk <= EXACT_TOLERANCE * max(1.0, abs(row.certificate))
            assert row.exact == met
        assert sum(b.curve_sources.values()) == pytest.approx(1.0)
    if math.isinf(p):  # with the MILP the per-sample worst margins are exact at every budget
        assert all(r.exact for r in on.results) and not all(r.exact for r in off.results)
        assert on.results[-1].curve_sources.get("milp_exact", 0.0) > 0.5
    data = on.to_dict()
    assert data["exact_mode"]["points_optimal"] == on.exact_mode.optimal


def test_used_points_mark_the_delta_column_and_the_maximising_piece():
    radii = torch.tensor([0.0, 0.1, 0.2, 0.4], dtype=torch.float64)
    values = torch.tensor([[0.0, 0.1, 0.3, 0.35], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    slopes = torch.full_like(values, 5.0)
    curves = GrowthCurves(radii=radii, values=values, slopes=slopes, reach=torch.full((2,), 0.4, dtype=torch.float64),
                          tail=values[:, -1], tail_slope=torch.zeros(2, dtype=torch.float64))
    used = used_points(curves, 0.2, math.inf, 0.0)
    assert used[:, 2].all() and used.sum() == 2
    # p = 1 with lam = 1.2: growth - 1.2 rho peaks on [0.1, 0.2] (0.3 - 1.2 * 0.16 at the kink)
    used = used_points(curves, 0.2, 1.0, 1.2)
    assert used[0].tolist() == [False, True, True, False]
    assert not used[1].any()  # a sample that gains nothing uses no point


def test_an_infinite_certificate_is_never_called_exact():
    # (a masked Transformer without a box printed "exact: yes" next to an infinite certificate)
    assert not is_exact(math.inf, 2.58)
    assert not is_exact(2.6, math.inf)
    assert is_exact(2.58 + EXACT_TOLERANCE / 2, 2.58) and not is_exact(2.7, 2.58)
