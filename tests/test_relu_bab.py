"""ReLU-splitting branch and bound (verifier.exact.relu_bab) and the W_p dual's penalised MILPs
(exact.milp.Penalty, certify.penalty_route): brute force and MILP truth on tiny nets, the unsplit
bound above, certificates that stay sound and become exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_exact import BOX, _load, _tiny_relu_2d, random_relu_case, tiny_certify_case

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, margin_problem, propagate
from verifier.certify.certificate import certify
from verifier.certify.exactness import EXACT_TOLERANCE
from verifier.certify.milp_route import ExactSettings
from verifier.exact.encode import encode_network
from verifier.exact.margins import milp_margins, sample_intervals
from verifier.exact.milp import PAD, Penalty, solve_margins
from verifier.exact.relu_bab import relu_split_margins


def _one(problem, i: int) -> InputSet:
    region = problem.region
    return InputSet(region.center[i:i + 1], region.radius[i:i + 1], region.norm, region.lower[i:i + 1],
                    region.upper[i:i + 1])


def _grid(center: np.ndarray, radius: float, count: int = 301) -> tuple[np.ndarray, np.ndarray]:
    """Points of a dense grid of the ℓ∞ ball ∩ box around a 2-D centre, and their ℓ∞ distances."""
    low, high = np.maximum(center - radius, BOX[0]), np.minimum(center + radius, BOX[1])
    axes = [np.linspace(low[k], high[k], count) for k in range(2)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    return points, np.abs(points - center).max(1)


def _worst(module, points: np.ndarray, label: int) -> np.ndarray:
    with torch.no_grad():
        logits = module(torch.from_numpy(points)).numpy()
    return np.delete(logits, label, 1).max(1) - logits[:, label]


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_splitting_meets_the_milp_and_brute_force_on_2d_nets(tmp_path, seed):
    converted = _load(tmp_path, _tiny_relu_2d(seed), f"tiny{seed}.onnx")
    module = converted.logits_module.double()
    network = BoundNetwork.from_model(converted)
    x = torch.from_numpy(np.random.default_rng(seed).uniform(-0.6, 0.6, size=(2, 2)))
    with torch.no_grad():
        y = module(x).argmax(1)
    for radius in (0.1, 0.5):
        truth = milp_margins(network, x, y, radius, "inf", BOX)
        linear = margin_bounds(network, x, y, radius, "inf", BOX).worst_margin
        problem = margin_problem(network, x, y, radius, "inf", BOX, torch.device("cpu"), torch.float64)
        for i in range(len(x)):
            solution = relu_split_margins(network, _one(problem, i), int(y[i]), tolerance=1e-5, max_leaves=4096)
            bound, exact = float(solution.upper.max()), float(truth[i].upper.max())
            brute = float(_worst(module, _grid(x[i].numpy(), radius)[0], int(y[i])).max())
            assert brute <= bound + 1e-9 and exact - 2 * PAD * (1 + abs(exact)) <= bound <= float(linear[i]) + 1e-9
            assert solution.complete and bound == pytest.approx(exact, abs=1e-5)
            assert solution.floor <= exact + 1e-9  # a real point's margin


def test_relu_splitting_on_a_random_net_at_any_stop(tmp_path):
    module, network, x, y = random_relu_case(tmp_path, 2)
    for norm, radius in (("inf", 0.3), ("1", 0.8)):
        truth = milp_margins(network, x, y, radius, norm, BOX)
        linear = margin_bounds(network, x, y, radius, norm, BOX).worst_margin
        problem = margin_problem(network, x, y, radius, norm, BOX, torch.device("cpu"), torch.float64)
        for i in range(len(x)):
            exact = float(truth[i].upper.max())
            previous = math.inf
            for leaves in (1, 9, 4096):  # stopped early, then run to completion: sound, never above the unsplit
                solution = relu_split_margins(network, _one(problem, i), int(y[i]), tolerance=1e-5,
                                              max_leaves=leaves, batch=4)
                bound = float(solution.upper.max())
                assert exact - 2 * PAD * (1 + abs(exact)) <= bound <= min(previous, float(linear[i])) + 1e-9
                previous = bound
            assert solution.complete and bound == pytest.approx(exact, abs=1e-5)
            point = solution.point[None]
            with torch.no_grad():
                logits = module(point)[0]
            attained = float(torch.cat([logits[:int(y[i])], logits[int(y[i]) + 1:]]).max() - logits[int(y[i])])
            assert attained == pytest.approx(solution.floor, abs=1e-9)


@pytest.mark.parametrize("lam,p", [(2.0, 2.0), (1.0, 1.5)])
def test_penalised_milp_bounds_the_penalised_brute_force_maximum(tmp_path, lam, p):
    converted = _load(tmp_path, _tiny_relu_2d(0), "tiny0.onnx")
    module = converted.logits_module.double()
    network = BoundNetwork.from_model(converted)
    x = torch.tensor([[0.1, -0.2]], dtype=torch.float64)
    with torch.no_grad():
        y = module(x).argmax(1)
    radius = 1.0
    problem = margin_problem(network, x, y, radius, "inf", BOX, torch.device("cpu"), torch.float64)
    state = propagate(network, problem.region)
    solution = solve_margins(encode_network(network, (2,)), x[0].numpy(), int(y[0]), problem.region.lower[0].numpy(),
                             problem.region.upper[0].numpy(), radius, "inf", sample_intervals(state, 0),
                             np.full(3, np.inf), penalty=Penalty(lam, p))
    points, distance = _grid(x[0].numpy(), radius, 601)
    brute = float((_worst(module, points, int(y[0])) - lam * distance**p).max())
    bound = float(solution.upper.max())
    # 601 points per axis: the grid's maximum is within its Lipschitz resolution of the true one.
    assert solution.optimal and brute <= bound <= brute + 0.01
    move = solution.point - x[0].numpy()
    attained = float(_worst(module, solution.point[None], int(y[0]))[0] - lam * np.abs(move).max() ** p)
    assert attained <= bound + 1e-9 and attained >= brute - 1e-3


@pytest.mark.parametrize("mode", ["on", "split"])
def test_certificates_with_penalised_or_split_points_stay_sound(tmp_path, mode):
    converted, module, x, y = tiny_certify_case(tmp_path)
    deltas = [0.3, 0.8]
    p = 2.0 if mode == "on" else math.inf
    off = certify(converted, x, y, deltas, p=p, norm="inf", loss="margin", box=BOX, grid_points=8, exact="off")
    on = certify(converted, x, y, deltas, p=p, norm="inf", loss="margin", box=BOX, grid_points=8,
                 exact=ExactSettings(mode, rounds=2))
    for a, b in zip(off.results, on.results):
        assert b.realised_risk <= b.certificate + 1e-9 and b.certificate <= a.certificate + 1e-12
        for row in (a, b):  # `exact` exactly when the realising distribution meets the certificate
            met = row.certificate - row.realised_risk <= EXACT_TOLERANCE * max(1.0, abs(row.certificate))
            assert row.exact == met
        assert sum(b.curve_sources.values()) == pytest.approx(1.0)
    assert all(r.exact for r in on.results) and not any(r.exact for r in off.results)
    expected = "milp_penalised" if mode == "on" else "split_exact"
    assert on.results[-1].curve_sources.get(expected, 0.0) > 0.5
    assert (on.exact_mode.penalised_points > 0) == (mode == "on")


def test_cli_exact_split_reports_the_splitting(tmp_path, capsys):
    import json

    from verifier import cli

    path = tmp_path / "tiny.onnx"
    path.write_bytes(_tiny_relu_2d(1).SerializeToString())
    converted = _load(tmp_path, _tiny_relu_2d(1), "copy.onnx")
    x = np.random.default_rng(5).uniform(-0.6, 0.6, size=(3, 2)).astype(np.float32)
    with torch.no_grad():
        y = converted.logits_module.double()(torch.from_numpy(x).double()).argmax(1).numpy()
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    code = cli.main(["certify", str(path), "--data", str(data), "--p", "inf", "--norm", "inf", "--delta", "0.3",
                     "--loss", "margin", "--box", "-1.5,1.5", "--grid-points", "6", "--exact", "split", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["exact_mode"]["solver"] == "split" and payload["exact_mode"]["points_solved"] > 0
    assert payload["results"][0]["realised_risk"] <= payload["results"][0]["certificate"] + 1e-9
