"""What each `verifier` command does with its parsed arguments: one `_run_*` per subcommand.

Each returns `(exit code, JSON payload, text)`; `verifier.cli` parses, prints and turns errors
into one line. The exit codes live here, with the commands that choose them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from verifier.cli_options import (deadline, memory_limit, optimise_mode, parse_box, parse_deltas, parse_normalisation,
                                  parse_p, tolerances)
from verifier.errors import UsageError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_TIME_LIMIT, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


def _run_inspect(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.summary import inspect_model

    summary = inspect_model(args.model, args.output, memory_limit(args))
    if summary.unsupported_message is None:
        return EXIT_OK, summary.to_dict(), summary.to_text()
    print(f"verifier: error: {summary.unsupported_message}", file=sys.stderr)
    payload = {**summary.to_dict(), "error": summary.unsupported_message, "error_type": "UnsupportedOpsError"}
    return EXIT_BAD_INPUT, payload, summary.to_text()


def _run_validate(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.data import random_samples
    from verifier.perturb import load_for_analysis

    tolerances(args)
    limit = memory_limit(args)
    loaded, samples, perturbation = load_for_analysis(args.model, args.data, args.perturb, args.samples, limit)
    spec = loaded.info.data_input
    if samples is None:
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
        samples = random_samples(spec, args.samples or fixed or 64, seed=args.seed, memory_limit_bytes=limit)
    from verifier.convert import convert_model  # heavy (torch, onnx2torch): after the input checks
    from verifier.validate import validate_against_onnxruntime

    converted = convert_model(loaded, args.output)
    report = validate_against_onnxruntime(loaded, converted, samples.x, args.atol, args.rtol, args.device, samples.y)
    payload = {"model": args.model, "data": samples.source, **report.to_dict(), "head": _head(converted),
               "batch": converted.batch.to_dict(), **_perturbation(perturbation)}
    lines = [
        f"model      {args.model}",
        *([f"perturb    {perturbation.describe()}"] if perturbation else []),
        f"head       {converted.head.reason}",
        f"batch      {converted.batch.describe()}",
        f"data       {samples.source} ({report.samples} samples)",
        f"providers  onnxruntime {', '.join(report.providers)}; torch {report.torch_device}",
    ]
    lines += [
        f"output     {o.name}: max abs diff {o.max_abs_diff:.3g}, max rel diff {o.max_rel_diff:.3g}"
        f"{'' if o.within_tolerance else '  <-- out of tolerance'}"
        for o in report.outputs
    ]
    lines.append("top-1      " + ("n/a (no class axis)" if report.top1_agreement is None
                                 else f"{report.top1_agreement:.2%} agreement"))
    if report.accuracy_onnxruntime is not None:
        lines.append(f"accuracy   onnxruntime {report.accuracy_onnxruntime:.2%}, torch {report.accuracy_torch:.2%}")
    lines.append(f"result     {'PASS' if report.passed else 'FAIL'} (atol {args.atol:g}, rtol {args.rtol:g})")
    return (EXIT_OK if report.passed else EXIT_CHECK_FAILED), payload, "\n".join(lines)


def _labelled_samples(args: argparse.Namespace):
    """The model (loaded and converted) and labelled samples from --data (checked before torch loads)."""
    from verifier.perturb import load_for_analysis

    if not args.data:
        raise UsageError("--data FILE.npz with inputs x and labels y is required")
    loaded, samples, perturbation = load_for_analysis(args.model, args.data, args.perturb, args.samples,
                                                      memory_limit(args))
    if samples.y is None:
        raise UsageError(f"{args.data} has no labels 'y'; certificates and attacks need them")
    from verifier.convert import convert_model
    return loaded, convert_model(loaded, args.output), samples, perturbation


def _perturbation(perturbation) -> dict:
    """`{"perturbation": ...}` for the JSON when --perturb was given, else nothing."""
    return {} if perturbation is None else {"perturbation": perturbation.to_dict()}


def _perturb_line(perturbation) -> str:
    """The threat-model line of the text output (empty without --perturb)."""
    return "" if perturbation is None else f"{perturbation.describe()}\n"


def _head(converted) -> dict:
    """Which output the logits come from, and how (`verifier.head.Head.to_dict`)."""
    return converted.head.to_dict()


def _refuse_folder(path: str | None) -> None:
    """Refuse an output file that is a folder before any work."""
    if path is not None and Path(path).is_dir():
        raise UsageError(f"cannot write {path}: it is a folder (give a file name ending in .npz)")


def _analysis_inputs(args: argparse.Namespace, deltas: list[float], box: tuple[float, float] | None):
    """`_labelled_samples` plus the box fitted to the data's dtype and the budget-scale warnings
    (printed on stderr as they are found, and returned for the JSON)."""
    from verifier.data import budget_scale_warning
    from verifier.perturb import fitted_threat_box

    normalisation = parse_normalisation(args.mean, args.std)
    loaded, converted, samples, perturbation = _labelled_samples(args)
    from verifier.geometry import parse_norm  # torch: only after the input checks
    box, perturbed, fitted = fitted_threat_box(samples, box, perturbation, normalisation)
    warning = budget_scale_warning(perturbed, deltas, parse_norm(args.norm), fitted)
    if warning and args.job.writer:
        print(f"verifier: warning: {warning}", file=sys.stderr)
    return loaded, converted, samples, box, [warning] if warning else [], perturbation


def _run_certify(args: argparse.Namespace) -> tuple[int, dict, str]:
    deltas, p, box = parse_deltas(args.delta), parse_p(args.p), parse_box(args.box)
    if args.grid_points < 2:
        raise UsageError("--grid-points must be at least 2")
    _refuse_folder(args.save_distributions)
    stop_at = deadline(args)
    loaded, converted, samples, box, warnings, perturbation = _analysis_inputs(args, deltas, box)
    from verifier.certify.certificate import certify, save_distributions  # heavy: after the input checks

    shard = args.job.shard(len(samples.x))
    result = certify(converted, shard.local(samples.x), shard.local(samples.y), deltas, p=p, norm=args.norm,
                     loss=args.loss, box=box, grid_points=args.grid_points, progress=_progress_wanted(args),
                     deadline=stop_at, memory_limit_bytes=memory_limit(args), exact=args.exact, shard=shard,
                     device=args.device, optimise_slopes=optimise_mode(args))
    if args.save_distributions and args.job.writer:
        save_distributions(result, args.save_distributions)
    return _analysis_result(args, samples, converted, result, warnings, perturbation)


def _run_attack(args: argparse.Namespace) -> tuple[int, dict, str]:
    deltas, p, box = parse_deltas(args.delta), parse_p(args.p), parse_box(args.box)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    _refuse_folder(args.save_adversarial)
    stop_at = deadline(args)
    loaded, converted, samples, box, warnings, perturbation = _analysis_inputs(args, deltas, box)
    from verifier.attacks import attack, save_adversarial  # heavy: after the input checks

    shard = args.job.shard(len(samples.x))
    report = attack(converted, loaded, shard.local(samples.x), shard.local(samples.y), methods, deltas, p=p,
                    norm=args.norm, loss=args.loss, box=box, steps=args.steps, kappa=args.kappa, topk=args.topk,
                    seed=args.seed, device=args.device, progress=_progress_wanted(args), deadline=stop_at, shard=shard,
                    memory_limit_bytes=memory_limit(args))
    if args.save_adversarial and args.job.writer:
        save_adversarial(report, args.save_adversarial)
    return _analysis_result(args, samples, converted, report, warnings, perturbation)


def _analysis_result(args: argparse.Namespace, samples, converted, result, warnings: list[str],
                     perturbation) -> tuple[int, dict, str]:
    """certify's or attack's exit code, JSON payload and text from its result (`to_dict`, `to_text`)."""
    from verifier.graph import json_safe

    payload = {"model": args.model, "data": samples.source, **result.to_dict(), "head": _head(converted),
               "warnings": warnings, **_perturbation(perturbation)}
    text = f"{_perturb_line(perturbation)}head: {converted.head.reason}\n{result.to_text()}"
    return EXIT_OK, json_safe(payload), text


def _run_audit(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.audit import AuditSettings, Thresholds, audit

    if not args.data:
        raise UsageError("--data FILE.npz with inputs x and labels y is required")
    if args.grid_points < 2:
        raise UsageError("--grid-points must be at least 2")
    atol, rtol = tolerances(args)
    settings = AuditSettings(
        deltas=tuple(parse_deltas(args.delta)), p=parse_p(args.p), norm=args.norm, loss=args.loss,
        attacks=tuple(m.strip() for m in args.attacks.split(",") if m.strip()), box=parse_box(args.box),
        normalisation=parse_normalisation(args.mean, args.std), atol=atol, rtol=rtol,
        samples=args.samples, seed=args.seed, device=args.device, time_limit=args.time_limit, output=args.output,
        perturb=args.perturb,
        thresholds=Thresholds(args.max_risk, args.min_certified_accuracy, args.min_robust_accuracy),
        memory_limit=memory_limit(args), grid_points=args.grid_points, exact=args.exact,
        optimise_slopes=optimise_mode(args))
    progress = _progress_wanted(args)

    def announce(stage: str) -> None:  # one line per stage, terminal or log file (CI), unless --quiet
        if not args.quiet and args.job.writer:
            print(f"verifier audit: {stage} ... ({time.monotonic() - args.started:.0f} s)", file=sys.stderr,
                  flush=True)

    outcome = audit(args.model, args.data, settings, args.out, on_stage=announce, progress=progress,
                    started=args.started, job=args.job)
    return outcome.exit_code, outcome.report, _audit_text(outcome) if outcome.paths is not None else ""


def _audit_text(outcome) -> str:
    from verifier.report.numbers import fmt, fmt_delta, fmt_pct

    report = outcome.report
    lines = [f"{'delta':>16} {'clean':>8} {'attack>=':>9} {'cert<=':>9} {'global':>9} {'cert.acc':>8} "
             f"{'att.acc':>8}  exact"]
    for row in report["results"]:
        lines.append(f"{fmt_delta(row['delta']):>16} {fmt(row['clean_risk']):>8} {fmt(row['best_attack_risk']):>9} "
                     f"{fmt(row['certificate']):>9} {fmt(row['global_bound']):>9} "
                     f"{fmt_pct(row['certified_accuracy']):>8} {fmt_pct(row['best_attack_accuracy']):>8}  "
                     f"{'yes' if row['exact'] else 'no'}")
    verdict = report["verdict"]
    lines += [f"verdict: {verdict['summary']}"] + [f"  - {failure}" for failure in verdict["failures"]]
    lines += [f"  ! {warning}" for warning in report["warnings"]]
    lines.append(f"report: {outcome.paths.html} (also report.json, report.md)")
    return "\n".join(lines)


EXIT_UNKNOWN = 5
_VNNLIB_EXIT = {"unsat": EXIT_OK, "sat": EXIT_CHECK_FAILED, "timeout": EXIT_TIME_LIMIT, "unknown": EXIT_UNKNOWN}


def _run_vnnlib(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.onnx_io import load_model
    from verifier.vnnlib import counterexample_text, read_property

    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds (got {args.timeout})")
    _refuse_folder(args.counterexample)
    prop = read_property(args.property)
    loaded = load_model(args.model, memory_limit(args))
    from verifier.convert import convert_model  # heavy: after the input checks
    from verifier.deadline import Deadline
    from verifier.vnnlib_check import check_property

    result = check_property(loaded, convert_model(loaded, args.output), prop,
                            Deadline.after(args.timeout, started=args.started))
    if args.counterexample:
        text = counterexample_text(*result.counterexample) if result.counterexample else f"{result.status}\n"
        try:
            Path(args.counterexample).write_text(text)
        except OSError as err:
            raise UsageError(f"cannot write {args.counterexample}: {err.strerror or err}") from err
    payload = {"model": args.model, "property": args.property, **result.to_dict()}
    line = f"{result.status}  ({result.reason}; {result.boxes} input box(es), {result.seconds:.1f} s)"
    return _VNNLIB_EXIT[result.status], payload, line


def _progress_wanted(args: argparse.Namespace) -> bool:
    """Progress bars redraw a line: only on a terminal (an audit's stage lines go to logs too), rank 0 only."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False) and (args.job is None or args.job.writer)
