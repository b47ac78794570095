"""Attacks (lower bounds on the Wasserstein robust risk, method §5): `attack()` runs several
methods at several budgets and replays every returned distribution in onnxruntime.

Methods (one module each on the shared base `base.py`): `wdapp` (WDA++: minimal flips and the
knapsack of §4), `wda` (targeted, kappa-mixture), `pgd` (point-wise), `wpgd` (Bai et al.'s
W-PGD; not defined for p = 1: asking for it explicitly with p = 1 is a `UsageError`, and
"all" skips it, listed in `AttackReport.skipped`), `wda-curve` (concave hull + multiple-choice
knapsack). Every result is an explicit distribution Q (atoms, weights, sources) with
W_p(Q, P_N) <= delta, checked in float64.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from verifier.attacks.base import Attack, Target
from verifier.attacks.target import rows_per_pass
from verifier.attacks.curve import CurveAttack
from verifier.attacks.monotone import monotone_in_delta
from verifier.attacks.pgd import PGD
from verifier.attacks.replay import Replayer, clean_numbers, measure
from verifier.attacks.result import AttackReport, AttackResult, Distribution, transport_cost
from verifier.attacks.wda import WDA
from verifier.attacks.wdapp import WDAPlusPlus
from verifier.attacks.wpgd import WPGD
from verifier.cells import displacement_box
from verifier.convert import ConvertedModel
from verifier.data import check_labels, save_distributions
from verifier.deadline import NEVER, Deadline
from verifier.device import resolve_device
from verifier.distributed import Shard
from verifier.errors import UsageError
from verifier.finite import require_finite_inputs
from verifier.geometry import parse_norm
from verifier.jacobian import prepared_module
from verifier.losses import check_loss
from verifier.onnx_io import LoadedModel
from verifier.resources import working_bytes

METHODS = ("wdapp", "wda", "pgd", "wpgd", "wda-curve")
ATTACK_SHARE = 0.75  # of a method's part of the time budget spent attacking; the rest: its replays, a pass in progress
ATTACKS: dict[str, type[Attack]] = {
    "wdapp": WDAPlusPlus, "wda": WDA, "pgd": PGD, "wpgd": WPGD, "wda-curve": CurveAttack,
}

def resolve_methods(methods: Sequence[str], p: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(methods to run, skipped with a reason); "all" expands to `METHODS`."""
    if isinstance(methods, str):
        methods = [methods]
    chosen: list[str] = []
    skipped: list[str] = []
    for name in methods:
        if name == "all":
            for each in METHODS:
                if each == "wpgd" and p == 1:
                    skipped.append("wpgd: not defined for p = 1 (its direction needs 1/p + 1/q = 1 with q < inf)")
                elif each not in chosen:
                    chosen.append(each)
        elif name not in ATTACKS:
            raise UsageError(f"unknown attack method {name!r}; choose from {', '.join(METHODS)} or all")
        elif name == "wpgd" and p == 1:
            raise UsageError("wpgd is not defined for p = 1 (Bai et al.'s direction needs p > 1); "
                             "use wdapp, wda, pgd or wda-curve")
        elif name not in chosen:
            chosen.append(name)
    if not chosen:
        raise UsageError("no attack method left to run")
    return tuple(chosen), tuple(dict.fromkeys(skipped))


def _check(p: float, deltas: Sequence[float], kappa: float, topk: int, steps: int | None, radii) -> None:
    if not p >= 1:
        raise UsageError(f"p must be >= 1 (got {p})")
    if len(deltas) == 0:
        raise UsageError("give at least one delta")
    if any(not (math.isfinite(d) and d >= 0) for d in deltas):
        raise UsageError(f"every delta must be finite and >= 0 (got {list(deltas)})")
    if not kappa >= 1:
        raise UsageError(f"kappa must be >= 1 (got {kappa})")
    if topk < 1:
        raise UsageError(f"topk must be >= 1 (got {topk})")
    if steps is not None and steps < 1:
        raise UsageError(f"steps must be >= 1 (got {steps})")
    if radii is not None:
        grid = torch.as_tensor(radii, dtype=torch.float64)
        if grid.ndim != 1 or len(grid) == 0 or not bool(torch.isfinite(grid).all()) or bool((grid < 0).any()):
            raise UsageError("radii must be a non-empty 1-D list of finite radii >= 0")


def _target(model: ConvertedModel, x, y, p: float, norm: str, loss: str, box, device: torch.device,
            deadline: Deadline, shard: Shard | None = None, memory_limit_bytes: int | None = None) -> Target:
    dtype = model.input_dtype
    module = prepared_module(model, device, dtype)
    inputs = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device=device, dtype=dtype)
    labels = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(device=device,
                                                                                      dtype=torch.long)
    if inputs.ndim < 2 or len(inputs) == 0 or labels.shape != (len(inputs),):
        raise UsageError(f"x needs a leading sample axis and y one label per sample "
                         f"(got x {tuple(inputs.shape)}, y {tuple(labels.shape)})")
    require_finite_inputs(inputs, "x")
    lower, upper = displacement_box(inputs.to(torch.float64), box)
    fixed = model.module_batch
    if shard is not None and shard.count != len(inputs):
        raise UsageError(f"the shard has {shard.count} samples but x has {len(inputs)}")
    total = len(inputs) if shard is None else shard.total
    rows = rows_per_pass(module, inputs, total, memory_limit_bytes, shard)
    target = Target(module, inputs, labels, norm, float(p), loss, lower, upper, fixed, deadline, shard, rows,
                    working_bytes=working_bytes(memory_limit_bytes))
    classes = target.clean_logits.shape[-1]  # (a pass every attack needs: the samples' own logits)
    check_labels(labels.cpu().numpy(), classes)
    return target


@dataclass(frozen=True, eq=False)
class Prepared:
    """What every method of an `attack()` call needs before its loops, built once by `prepare` (an
    audit runs its methods as separate calls on one `Prepared`): the target (module, samples, their
    logits, the pass timings), the onnxruntime replayer, the clean (risk, accuracy), and the seconds
    one delta's replay should take (a torch and an onnxruntime pass of the samples: `measure`
    compares the runtimes on every moved atom; timed on the clean samples)."""

    target: Target
    replayer: Replayer | None
    clean: tuple[float, float]
    replay_seconds: float


def prepare(model: ConvertedModel, loaded: LoadedModel | None, x: torch.Tensor | np.ndarray,
            y: torch.Tensor | np.ndarray, p: float = 2.0, norm: str = "inf", loss: str = "ce",
            box: tuple[float, float] | None = None, device: str = "auto", deadline: Deadline = NEVER,
            shard: Shard | None = None, memory_limit_bytes: int | None = None) -> Prepared:
    """The target, replayer and clean numbers for `attack()` (arguments as there); `loaded=None`: no replay."""
    torch_device = resolve_device(device)
    target = _target(model, x, y, float(p), parse_norm(norm), check_loss(loss), box, torch_device, deadline, shard,
                     memory_limit_bytes)
    replayer = Replayer(loaded, model, torch_device, target.rows_per_pass) if loaded is not None else None
    began = deadline.clock()
    clean = clean_numbers(target, replayer)
    return Prepared(target, replayer, clean, deadline.clock() - began + target.forward_seconds(target.count))


def _progress(methods: tuple[str, ...], progress: bool):
    """tqdm over the methods on stderr (tqdm is optional: without it, no bar)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is not a declared dependency yet
        return methods
    return tqdm(methods, desc="attacks", disable=not progress, file=sys.stderr)


def attack(model: ConvertedModel, loaded: LoadedModel | None, x: torch.Tensor | np.ndarray,
           y: torch.Tensor | np.ndarray, methods: Sequence[str], deltas: Sequence[float], p: float = 2.0,
           norm: str = "inf", loss: str = "ce", box: tuple[float, float] | None = None,
           steps: int | None = None, kappa: float = 1.0, topk: int = 9, seed: int = 0, device: str = "auto",
           radii: torch.Tensor | None = None, progress: bool = False, deadline: Deadline = NEVER,
           shard: Shard | None = None, budget: Deadline | None = None,
           memory_limit_bytes: int | None = None, prepared: Prepared | None = None) -> AttackReport:
    """Run every method at every delta; one `AttackResult` per (method, delta), in that order.

    Anytime: `budget` (default: `deadline`) is shared out, each method getting an equal part of
    the time left (`ATTACK_SHARE` of it, the rest for the replays) and each delta an equal part of
    its method's; a loop past its part stops at its next step and the method returns the best
    points found so far, flagged "time-limited". A method's result at a delta is never weaker than
    at a smaller one: the smaller delta's distribution, feasible there too, is carried forward
    (`verifier.attacks.monotone`, flagged "carried from delta ..."). `deadline` is the hard limit, checked before every
    forward or gradient pass (each step, each chunk of atoms) and before each replay; past it
    `verifier.deadline.Stopped` is raised.

    Risk and accuracy come from onnxruntime forward passes of the returned atoms (`loaded` is the
    original model; with `loaded=None` torch values are reported, flagged "not-replayed").
    Random draws come from per-sample generators seeded from (`seed`, the sample's index): on the
    CPU the report is identical for a fixed seed (up to `seconds`).

    `shard` (verifier.distributed): `x`, `y` are this rank's samples of a sharded run; the global
    steps (knapsacks, W-PGD's batch coupling, means) gather the other ranks' per-sample tables, and
    every rank returns the same report, that of one process over all samples.

    `prepared` (`prepare` with the same model, samples and threat model): reused instead of building
    the target and replaying the clean samples again (on a large model these passes cost as much as
    a step).
    """
    p, norm, loss = float(p), parse_norm(norm), check_loss(loss)
    deltas = [float(d) for d in deltas]
    _check(p, deltas, kappa, topk, steps, radii)
    chosen, skipped = resolve_methods(methods, p)
    if prepared is None:
        prepared = prepare(model, loaded, x, y, p, norm, loss, box, device, deadline, shard, memory_limit_bytes)
    target, replayer, clean, replay = (prepared.target.with_deadline(deadline), prepared.replayer, prepared.clean,
                                       prepared.replay_seconds)
    if (target.p, target.norm, target.loss) != (p, norm, loss):
        raise UsageError(f"the prepared target is for p={target.p:g}, norm {target.norm}, loss {target.loss}; "
                         f"this attack asks for p={p:g}, norm {norm}, loss {loss}")
    results: list[AttackResult] = []
    budget = deadline if budget is None else budget
    for index, name in enumerate(_progress(chosen, progress)):
        left = len(chosen) - index
        share = NEVER if math.isinf(budget.at) else budget.sooner(ATTACK_SHARE / left, replay * len(deltas) * left)
        runner = ATTACKS[name](target, steps=steps, seed=seed, budget=share, reserve=replay, kappa=kappa,
                               topk=topk, radii=radii, box=box)
        measured = []
        for delta, dist in zip(deltas, runner.run(deltas)):
            deadline.check("the replay of an attack")
            measured.append(measure(name, delta, dist, target, replayer, clean))
        results.extend(monotone_in_delta(measured))  # a smaller delta's distribution is feasible at a larger one
    return AttackReport(p=p, norm=norm, loss=loss, box=None if box is None else (float(box[0]), float(box[1])),
                        samples=target.total, seed=int(seed), results=tuple(results), skipped=skipped)


def save_adversarial(report: AttackReport, path: str | os.PathLike[str]) -> None:
    """Write every (method, delta) distribution to one npz: `atoms_k`, `weights_k`, `source_k` and
    the index arrays `methods` and `deltas` (entry k describes distribution k)."""
    save_distributions(path, [(r.atoms.detach().cpu().numpy(), r.weights.detach().cpu().numpy(),
                               r.source.detach().cpu().numpy()) for r in report.results],
                       methods=np.array([r.method for r in report.results]),
                       deltas=np.array([r.delta for r in report.results]))


__all__ = ["ATTACKS", "METHODS", "AttackReport", "AttackResult", "Distribution", "Prepared", "attack", "prepare",
           "resolve_methods", "save_adversarial", "transport_cost"]
