"""Exact per-sample margins of small piecewise-linear networks: a MILP over the ball ∩ box (method §8)."""
