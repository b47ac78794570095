"""The smooth activations' formulas and the constants derived from them (method.md §3.1, §3.4, §3.7).

`smooth(key, x, order)` is sigma (order 0), sigma' (1) or sigma'' (2) of gelu, gelu_tanh, silu,
sigmoid, tanh and softplus, in cancellation-free float64 formulas. At import, bisection in float64
derives, rounded outward: `CRITICAL_POINT` (where sigma'' = 0), `CRITICAL_VALUES` (sigma' there),
`MINIMUM` (minimiser and minimum of the quasi-convex kinds) and `LIPSCHITZ` (max |sigma'| of every
elementwise kind, rounded up at the 5th decimal). `verifier.bounds.relaxations` builds its sound
bounds on these; `verifier.bounds.global_lipschitz` uses `LIPSCHITZ`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_BIG = 1e4  # derivatives clamp x to +-_BIG: beyond it sigma' equals its limit to far below 1 ulp
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5 x (1 + tanh(K (x + C x^3))) = x sigmoid(2K (x + C x^3))
_C = 0.044715


def fix_inf(x: Tensor, y: Tensor) -> Tensor:
    """Limits at +-inf where the formula gives inf * 0 = nan (x * sigmoid(x) etc.: the limit is 0)."""
    return torch.where(torch.isinf(x) & torch.isnan(y), torch.zeros_like(y), y)


def smooth(key: str, x: Tensor, order: int) -> Tensor:
    """sigma (order 0), sigma' (1) or sigma'' (2) of a smooth kind, cancellation-free formulas."""
    if order:
        x = x.clamp(-_BIG, _BIG)
    if key == "gelu":  # x Phi(x), Phi via erfc (no 1 + erf cancellation for x << 0)
        if order == 0:
            return fix_inf(x, x * 0.5 * torch.special.erfc(-x / _SQRT2))
        pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return 0.5 * torch.special.erfc(-x / _SQRT2) + x * pdf if order == 1 else pdf * (2.0 - x * x)
    if key == "gelu_tanh":
        z = 2.0 * _K * (x + _C * x * x * x)
        s = torch.sigmoid(z)
        if order == 0:
            return fix_inf(x, x * s)
        dz, q = 2.0 * _K * (1.0 + 3.0 * _C * x * x), s * torch.sigmoid(-z)
        if order == 1:
            return s + x * q * dz
        return q * (2.0 * dz - x * torch.tanh(0.5 * z) * dz * dz + x * 12.0 * _K * _C * x)
    if key == "silu":
        s = torch.sigmoid(x)
        if order == 0:
            return fix_inf(x, x * s)
        return s * (1.0 + x * torch.sigmoid(-x)) if order == 1 else \
            s * torch.sigmoid(-x) * (2.0 - x * torch.tanh(0.5 * x))
    if key == "sigmoid":
        s = torch.sigmoid(x)
        return s if order == 0 else s * torch.sigmoid(-x) * (1.0 if order == 1 else -torch.tanh(0.5 * x))
    if key == "tanh":
        t = torch.tanh(x)
        return t if order == 0 else (1.0 - t) * (1.0 + t) * (1.0 if order == 1 else -2.0 * t)
    if key == "softplus":  # own formula: torch's softplus returns x itself above 20 (error ~1e-9)
        if order == 0:
            return x.clamp(min=0.0) + torch.log1p(torch.exp(-x.abs()))
        s = torch.sigmoid(x)
        return s if order == 1 else s * torch.sigmoid(-x)
    raise ValueError(f"unknown smooth activation {key!r}")


def _bisect(fn: Callable[[float], float], lo: float, hi: float) -> float:
    """Float64 root of a sign change of fn on [lo, hi] (fn(lo) < 0 < fn(hi) or reverse), to 1 ulp."""
    rising = fn(lo) < 0.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if (fn(mid) < 0.0) == rising:
            lo = mid
        else:
            hi = mid


def _scalar(key: str, order: int) -> Callable[[float], float]:
    """`smooth` of one float64 number, as a plain function."""
    return lambda x: float(smooth(key, torch.tensor(x, dtype=torch.float64), order))


# Constants of method.md §3.4 / §3.7, derived at import in float64 by bisection (1 ulp) and then
# rounded outward by 1e-14, far above the few-ulp evaluation error of the formulas above.
# CRITICAL_POINT: the critical point c > 0 of sigma' (sigma'' = 0): sigma' falls on (-inf, -c),
# rises on (-c, c), falls on (c, inf) (sigmoid/tanh: c = 0; softplus: sigma' = sigmoid is monotone).
CRITICAL_POINT: dict[str, float | None] = {"sigmoid": 0.0, "tanh": 0.0, "softplus": None}
CRITICAL_POINT.update({k: _bisect(_scalar(k, 2), 0.5, 3.0) for k in ("gelu", "gelu_tanh", "silu")})
# sigma' at its critical points: (min, max), rounded outward.
CRITICAL_VALUES: dict[str, tuple[float, float]] = {
    k: (_scalar(k, 1)(-c) - 1e-14, _scalar(k, 1)(c) + 1e-14)
    for k, c in CRITICAL_POINT.items() if c not in (None, 0.0)
}
CRITICAL_VALUES.update({"sigmoid": (0.25 - 1e-14, 0.25 + 1e-14), "tanh": (1.0 - 1e-14, 1.0 + 1e-14)})
# Quasi-convex kinds: (minimiser, minimum value rounded down). hard_swish: x(x + 3)/6 at -3/2.
MINIMUM: dict[str, tuple[float, float]] = {
    k: (m, _scalar(k, 0)(m) - 1e-14)
    for k in ("gelu", "gelu_tanh", "silu") for m in [_bisect(_scalar(k, 1), -CRITICAL_POINT[k], 0.0)]
}
MINIMUM["hard_swish"] = (-1.5, -0.375)
# Global Lipschitz constants (method.md §3.1): max |sigma'|, rounded up at the 5th decimal.
LIPSCHITZ = {k: math.ceil(CRITICAL_VALUES[k][1] * 1e5) / 1e5 for k in ("gelu", "gelu_tanh", "silu")}
LIPSCHITZ.update(relu=1.0, abs=1.0, clip=1.0, softplus=1.0, hard_swish=1.5, sigmoid=0.25, tanh=1.0)
