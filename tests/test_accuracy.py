"""Certified accuracy: the fractional knapsack against a linear program on random instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from verifier.certify.accuracy import certified_accuracy, flippable_mass


def _lp_mass(radii: np.ndarray, correct: np.ndarray, delta: float, p: float) -> float:
    """max sum alpha_i / N  s.t.  sum alpha_i c_i^p / N <= delta^p, 0 <= alpha_i <= 1 (correct only)."""
    costs = radii[correct] ** p / len(radii)
    if len(costs) == 0:
        return 0.0
    result = linprog(-np.ones(len(costs)) / len(radii), A_ub=[costs], b_ub=[delta**p],
                     bounds=[(0, 1)] * len(costs))
    return -result.fun


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.just(0.0), st.floats(0.05, 2.0)), st.booleans()),  # LP-tolerance safe
                min_size=1, max_size=12),
       st.one_of(st.just(0.0), st.floats(0.05, 1.5)), st.sampled_from([1.0, 1.5, 2.0, 4.0]))
def test_knapsack_equals_the_linear_program(samples, delta, p):
    radii = np.array([s[0] for s in samples])
    correct = np.array([s[1] for s in samples])
    mass = flippable_mass(torch.from_numpy(radii), torch.from_numpy(correct), delta, p)
    assert mass == pytest.approx(_lp_mass(radii, correct, delta, p), abs=1e-9)


def test_p_inf_flips_exactly_the_points_within_delta():
    radii = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0], dtype=torch.float64)
    correct = torch.tensor([True, True, True, False, True])
    assert certified_accuracy(radii, correct, 0.2, math.inf) == pytest.approx(0.8 - 0.6)
    assert certified_accuracy(radii, correct, 0.0, math.inf) == pytest.approx(0.8 - 0.2)  # c = 0 flips at once


def test_accuracy_decreases_with_delta_and_p():
    generator = torch.Generator().manual_seed(0)
    radii = torch.rand(50, generator=generator, dtype=torch.float64)
    correct = torch.rand(50, generator=generator) < 0.9
    previous = 1.0
    for delta in (0.0, 0.05, 0.1, 0.3, 1.0):
        values = [certified_accuracy(radii, correct, delta, p) for p in (1.0, 2.0, math.inf)]
        assert values[0] <= values[1] + 1e-12 <= values[2] + 2e-12  # larger p: a smaller W_p ball
        assert values[0] <= previous + 1e-12
        previous = values[0]
