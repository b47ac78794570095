"""`audit`: the pre-deployment pipeline in one call, ending in a report (docs/report.md).

inspect → validate (torch vs onnxruntime; a mismatch stops the audit, exit 1) → certify over the
delta grid → each attack over the grid → report.json / report.html / report.md. A time limit is
checked between stages and, through one `Deadline` passed down, inside certify and the attacks
between chunks of work (propagation nodes and unit chunks, sample chunks, attack steps): when it
is hit, the stages done so far are written as a partial report (`complete: false`, exit 3;
`stopped_at` names the first stage not completed). Every number in the report is the one
`certify()` / `attack()` return for the same settings.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from verifier import __version__
from verifier.allocator import release_freed_memory
from verifier.attacks import METHODS, attack, prepare, resolve_methods
from verifier.attacks.base import NO_STEP, TIME_LIMITED
from verifier.certify.certificate import Certificate, certify, slope_search
from verifier.certify.milp_route import EXACT_MODES
from verifier.convert import convert_model
from verifier.data import budget_scale_warning, load_samples
from verifier.perturb import fitted_threat_box, load_for_analysis
from verifier.deadline import Deadline, Stopped, Terminated, reraise_signal
from verifier.device import resolve_device
from verifier.distributed import Job
from verifier.errors import UsageError
from verifier.geometry import parse_norm
from verifier.graph import OperatorGraph
from verifier.head import choose_head
from verifier.losses import check_loss
from verifier.report import SCHEMA_VERSION, ReportPaths, finalize_report, write_report
from verifier.summary import summarize_model
from verifier.validate import validate_against_onnxruntime

DEFAULT_DELTAS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
DEFAULT_ATTACKS = ("wdapp", "wda", "pgd", "wpgd")
# Under a time limit certify's refinements stop at this share of the time left, so that the
# attacks after it get the rest (both are anytime: the attacks share out what is left).
CERTIFY_REFINE_SHARE = 0.4
# Each attack gets this share of the time left over the attacks still to run: the rest is a margin
# for what a share cannot cut (a pass of a large model in progress, the onnxruntime replays).
ATTACKS_SHARE = 0.85


@dataclass(frozen=True)
class Thresholds:
    """Deployment gates, each checked at every delta (None: not checked)."""

    max_risk: float | None = None
    min_certified_accuracy: float | None = None
    min_robust_accuracy: float | None = None


@dataclass(frozen=True)
class AuditSettings:
    """What to audit: the budget grid, the threat model, the attacks and the gates."""

    deltas: tuple[float, ...] = DEFAULT_DELTAS
    p: float = 2.0
    norm: str = "inf"
    loss: str = "ce"
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    box: tuple[float, float] | None = None
    samples: int | None = None
    seed: int = 0
    device: str = "auto"
    time_limit: float | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    grid_points: int = 24
    steps: int | None = None
    output: str | None = None  # the graph output that is the classifier head (None: the default choice)
    memory_limit: int | None = None  # bytes; None: half of the available memory
    exact: str = "auto"  # the MILP route (certify.milp_route): auto | on | off
    optimise_slopes: str | None = None  # certify's slope search (None: off, "final", "intermediate")
    perturb: str | None = None  # the perturbed input or internal tensor (None: the only input; verifier.perturb)
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # --mean/--std (box.normalised_box)
    atol: float = 1e-5  # the conversion check's tolerances (--atol/--rtol, as validate's)
    rtol: float = 1e-5


@dataclass(frozen=True)
class AuditOutcome:
    """The finalised report dict, where it was written, and the exit code it implies."""

    report: dict
    paths: ReportPaths | None  # None on the ranks of a torchrun job other than rank 0 (nothing written)
    exit_code: int


class _Clock:
    """Wall time per stage against an optional limit counted from `started` (default: now)."""

    def __init__(self, limit: float | None, started: float | None = None) -> None:
        self.start = time.monotonic()
        # the module's clock, looked up now (tests replace it); one Deadline for stages and loops
        self.stop = Deadline.after(limit, clock=time.monotonic, started=self.start if started is None else started)
        self.timings: dict[str, float | None] = {s: None for s in ("inspect", "validate", "certify", "attacks",
                                                                    "report")}

    def expired(self) -> bool:
        return self.stop.expired()

    def deadline(self) -> Deadline:
        """The limit as the `Deadline` certify and the attacks check inside their loops."""
        return self.stop

    def run(self, stage: str, work: Callable):
        began = time.monotonic()
        try:
            return work()
        except Exception as err:  # a signal that library code re-raised as another error is still a signal
            reraise_signal(err)
            raise
        finally:
            self.timings[stage] = (self.timings[stage] or 0.0) + time.monotonic() - began


def _check(settings: AuditSettings) -> AuditSettings:
    """Refuse bad settings early, with one line (exit 2)."""
    if not settings.deltas or any(not (d >= 0 and np.isfinite(d)) for d in settings.deltas):
        raise UsageError("give at least one delta, all finite and >= 0")
    if not settings.p >= 1:
        raise UsageError(f"p must be >= 1 (got {settings.p})")
    if settings.exact not in EXACT_MODES:
        raise UsageError(f"exact must be one of {', '.join(EXACT_MODES)} (got {settings.exact!r})")
    search = slope_search(settings.optimise_slopes)  # refuses an unknown search in one line
    settings = replace(settings, optimise_slopes=None if search is None else  # the report's spelling
                       "intermediate" if search.intermediate else "final")
    if settings.time_limit is not None and not settings.time_limit > 0:
        raise UsageError(f"the time limit must be > 0 seconds (got {settings.time_limit})")
    gates = settings.thresholds
    if gates.max_risk is not None and not np.isfinite(gates.max_risk):
        raise UsageError(f"max-risk must be a finite number (got {gates.max_risk})")
    for name in ("min_certified_accuracy", "min_robust_accuracy"):
        value = getattr(gates, name)
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{name.replace('_', '-')} must lie in [0, 1] (got {value})")
    requested = [m for m in settings.attacks if not (m == "wpgd" and settings.p == 1
                                                     and tuple(settings.attacks) == DEFAULT_ATTACKS)]
    if tuple(settings.attacks) == DEFAULT_ATTACKS and np.isfinite(settings.p) and settings.loss == "ce":
        requested.append("wda-curve")  # the strongest risk attack for p < inf and CE (docs/benchmarks.md)
    methods, _ = resolve_methods(requested, settings.p)  # the default list drops wpgd for p = 1
    return AuditSettings(**{**settings.__dict__, "deltas": tuple(sorted(set(float(d) for d in settings.deltas))),
                            "norm": parse_norm(settings.norm), "loss": check_loss(settings.loss),
                            "attacks": methods})


def _check_creatable(out: Path) -> None:
    """Refuse, before any work, a report folder that could not be created or written."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot create the report folder {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create the report folder {out}: {existing} is not writable")


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"verifier": __version__, "python": platform.python_version()}
    for package in ("torch", "onnx", "onnxruntime", "onnx2torch", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = metadata.version("onnxruntime-gpu") if package == "onnxruntime" and \
                _installed("onnxruntime-gpu") else None
    return found


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _rows(certificate: Certificate | None, attacks_done: dict[str, list[dict]]) -> list[dict]:
    """One result per delta that certify reached (raw fields of docs/report.md)."""
    if certificate is None:
        return []
    rows = []
    for index, row in enumerate(certificate.results):
        rows.append({
            "delta": row.delta, "clean_risk": row.clean_risk, "clean_accuracy": certificate.clean_accuracy,
            "certificate": row.certificate, "global_bound": row.global_bound,
            "first_order_estimate": row.first_order_estimate, "certified_accuracy": row.certified_accuracy,
            "exact": row.exact, "fallbacks": list(row.fallbacks), "curve_sources": dict(row.curve_sources),
            "attacks": {method: results[index] for method, results in attacks_done.items()},
        })
    return rows


def _attack_entry(result) -> dict:
    return {"risk": result.risk, "robust_accuracy": result.robust_accuracy, "transport_cost": result.transport_cost,
            "replayed_in_onnxruntime": result.replayed_in_onnxruntime, "seconds": result.seconds,
            "flags": list(result.flags)}


def _late_warnings(method: str, results) -> list[str]:
    """One line for the deltas where the attack took no step, one for those its time limit cut short."""
    idle = [f"{r.delta:g}" for r in results if NO_STEP in r.flags]
    late = [f"{r.delta:g}" for r in results if TIME_LIMITED in r.flags and NO_STEP not in r.flags]
    return ([f"attack {method} took no step within the time limit at delta {', '.join(idle)}: not attacked "
             "there (its numbers are the samples' own, left out of the best attack)"] if idle else []) + \
        ([f"attack {method} stopped early by the time limit at delta {', '.join(late)}: "
          "its numbers there are weaker lower bounds"] if late else [])


def audit(model_path: str | os.PathLike[str], data_path: str | os.PathLike[str],
          settings: AuditSettings = AuditSettings(), out_dir: str | os.PathLike[str] = "verifier-report",
          on_stage: Callable[[str], None] | None = None, progress: bool = False,
          started: float | None = None, job: Job = Job()) -> AuditOutcome:
    """Run the whole audit and write the report; `on_stage(name)` is called as each stage starts.

    The time limit counts from `started` (a `time.monotonic()` reading, e.g. when the command
    began, so that imports count) or from this call. `job` (verifier.distributed): one rank of a
    torchrun job certifies and attacks its shard of the samples; every rank takes the same
    decisions (time limit, stops) and rank 0 alone writes the report (the others return no paths).
    """
    skipped = resolve_methods(["all"], settings.p)[1] if settings.p == 1 and (
        "all" in settings.attacks or tuple(settings.attacks) == DEFAULT_ATTACKS) else ()
    settings = _check(settings)
    # a bad model, data file, --perturb or --output: exit 2 before any folder
    loaded, perturbed, perturbation = load_for_analysis(model_path, data_path if settings.perturb else None,
                                                        settings.perturb, settings.samples, settings.memory_limit)
    choose_head(OperatorGraph(loaded.proto), settings.output)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")
    _check_creatable(out)  # created only when the report is written: a refusal leaves nothing behind
    clock = _Clock(settings.time_limit, started)
    announce = on_stage or (lambda _stage: None)
    stopped_at: str | None = None
    conversion = certificate = None
    attacks_done: dict[str, list[dict]] = {}
    warnings: list[str] = [f"attack skipped: {reason}" for reason in skipped]

    announce("inspect")
    summary = clock.run("inspect", lambda: summarize_model(loaded, settings.output))
    samples = perturbed or clock.run("inspect", lambda: load_samples(data_path, loaded.info.data_input,
                                                                     settings.samples, settings.memory_limit))
    if samples.y is None:
        raise UsageError(f"{data_path} has no labels 'y'; the audit needs them")
    device = resolve_device(settings.device)
    x, y = samples.x, samples.y
    shard = job.shard(len(x))
    box, values, fitted = fitted_threat_box(samples, settings.box, perturbation, settings.normalisation)
    scale = budget_scale_warning(values, settings.deltas, settings.norm, fitted)
    warnings += ([perturbation.describe()] if perturbation else []) + ([scale] if scale else [])
    if samples.box is not None:
        warnings.append(f"threat model: the box is per coordinate, lo..hi from {samples.source} "
                        f"(envelope [{samples.box[0]:g}, {samples.box[1]:g}])")
    if settings.normalisation is not None:
        warnings.append(f"threat model: the box is per channel, (raw - mean) / std for raw values in "
                        f"{list(settings.box or (0.0, 1.0))} (--mean/--std; envelope [{fitted[0]:g}, {fitted[1]:g}])")
    if job.agree(clock.expired()):
        stopped_at = "validate"
    else:
        announce("validate")
        try:
            converted = clock.run("validate", lambda: convert_model(loaded, settings.output))
            conversion = clock.run("validate", lambda: validate_against_onnxruntime(
                loaded, converted, x, settings.atol, settings.rtol, settings.device, y))
        except Terminated as err:  # a signal; the time limit is only checked between these two steps
            stopped_at = "validate"
            warnings.append(f"audit {err}")
        if stopped_at is not None:
            pass
        elif not conversion.passed:
            stopped_at = "certify"
            warnings.append("audit stopped after the conversion check: the torch module does not compute what "
                            "the ONNX file computes, so no certificate or attack on it would be trustworthy")
        elif job.agree(clock.expired()):
            stopped_at = "certify"
        else:
            announce("certify")
            try:  # a signal may come at any point in here: Terminated leaves a partial report
                release_freed_memory()  # the conversion check's freed tensors and sessions, before certify's passes
                certificate = clock.run("certify", lambda: certify(
                    converted, shard.local(x), shard.local(y), list(settings.deltas), p=settings.p,
                    norm=settings.norm, loss=settings.loss, box=box, grid_points=settings.grid_points,
                    progress=progress, deadline=clock.deadline(), memory_limit_bytes=settings.memory_limit,
                    refine_share=CERTIFY_REFINE_SHARE, exact=settings.exact, shard=shard, device=settings.device,
                    optimise_slopes=settings.optimise_slopes))
            except Stopped as err:
                job.share(err)
                stopped_at = "certify"
                warnings += [f"audit {err}"] if isinstance(err, Terminated) else []
            methods = settings.attacks if certificate is not None else ()
            prepared = None
            for index, method in enumerate(methods):
                if job.agree(clock.expired()):
                    stopped_at = "attacks"
                    break
                announce(f"attack {method}")
                try:
                    release_freed_memory()  # the last stage's freed tensors stay in the heaps otherwise
                    if prepared is None:  # once for every attack: the target, the replayer, the clean numbers
                        prepared = clock.run("attacks", lambda: prepare(
                            converted, loaded, shard.local(x), shard.local(y), p=settings.p, norm=settings.norm,
                            loss=settings.loss, box=box, device=settings.device, deadline=clock.deadline(),
                            shard=shard, memory_limit_bytes=settings.memory_limit))
                    # anytime: each attack gets an equal share of the time left, and stops early with its best
                    share = clock.deadline().sooner(ATTACKS_SHARE / (len(methods) - index))
                    report = clock.run("attacks", lambda m=method, b=share: attack(
                        converted, loaded, shard.local(x), shard.local(y), [m], list(settings.deltas), p=settings.p,
                        norm=settings.norm, loss=settings.loss, box=box, steps=settings.steps, seed=settings.seed,
                        device=settings.device, progress=progress, deadline=clock.deadline(), shard=shard,
                        budget=b, memory_limit_bytes=settings.memory_limit, prepared=prepared))
                except Stopped as err:
                    job.share(err)
                    stopped_at = "attacks"
                    warnings += [f"audit {err}"] if isinstance(err, Terminated) else []
                    break
                attacks_done[method] = [_attack_entry(r) for r in report.results]
                warnings += _late_warnings(method, report.results)
    announce("report")
    began = time.monotonic()
    raw = {
        "schema_version": SCHEMA_VERSION, "complete": stopped_at is None, "stopped_at": stopped_at,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "producer": {"name": "verifier", "version": __version__}, "versions": _versions(),
        "device": str(device), "seed": settings.seed,
        "model": {**summary.to_dict(), "path": str(model_path),
                  **({"perturbation": perturbation.to_dict()} if perturbation else {})},
        "data": {"path": str(data_path), "sha256": _sha256(data_path), "samples": len(samples)},
        "conversion": None if conversion is None else conversion.to_dict(),
        "settings": {
            "p": settings.p, "norm": settings.norm, "loss": settings.loss,
            "box": None if settings.box is None else list(settings.box), "deltas": list(settings.deltas),
            "attacks": list(settings.attacks), "samples": len(samples), "time_limit": settings.time_limit,
            "thresholds": dict(settings.thresholds.__dict__), "exact": settings.exact,
            "optimise_slopes": settings.optimise_slopes,
        },
        "exact_mode": None if certificate is None or certificate.exact_mode is None else certificate.exact_mode.to_dict(),
        "timings": {**clock.timings, "total": None},
        "local_slopes": None if certificate is None or certificate.local_slopes is None else {
            "norm": settings.norm, "per_sample": certificate.local_slopes.tolist(),
            "global": certificate.global_slope if certificate.global_slope is not None else float("inf")},
        "results": _rows(certificate, attacks_done),
        "warnings": warnings,
    }
    raw["timings"]["report"] = time.monotonic() - began
    raw["timings"]["total"] = time.monotonic() - clock.start
    report = finalize_report(raw)
    if not job.writer:
        return AuditOutcome(report=report, paths=None, exit_code=report["verdict"]["exit_code"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the report folder {out_dir}: {err.strerror or err}") from err
    paths = write_report(report, out)
    return AuditOutcome(report=report, paths=paths, exit_code=report["verdict"]["exit_code"])


__all__ = ["DEFAULT_ATTACKS", "DEFAULT_DELTAS", "METHODS", "AuditOutcome", "AuditSettings", "Thresholds", "audit"]
