"""`verifier` command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 a check failed (e.g. the conversion does not match onnxruntime),
2 bad input or usage (one line on stderr, no traceback), 3 the time limit was hit, 4 internal
error (a bug: please report).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

from verifier import __version__
from verifier.deadline import Stopped
from verifier.errors import UsageError, VerifierError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_TIME_LIMIT, EXIT_INTERNAL = 0, 1, 2, 3, 4


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="path to the ONNX model")
    parser.add_argument("--memory-limit", metavar="SIZE", default=None,
                        help="refuse work that would need more memory than SIZE, e.g. 8G or 512M "
                             "(default: half of the memory available at start)")


def _memory_limit(args: argparse.Namespace) -> int | None:
    from verifier.resources import parse_size

    return None if args.memory_limit is None else parse_size(args.memory_limit)


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="NAME", default=None,
                        help="the graph output that is the classifier head (default: the first float output "
                             "that is not a pass-through of the input; `inspect` lists them)")


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_data(parser: argparse.ArgumentParser, random_fallback: bool = False, seed: bool = True) -> None:
    parser.add_argument("--data", metavar="FILE.npz", help="npz with arrays x (float inputs) and y (int labels)"
                        + ("" if random_fallback else "; required"))
    parser.add_argument("--samples", type=int, metavar="N",
                        help="use the first N samples (default: all" + (", or 64 random)" if random_fallback else ")"))
    if seed:
        parser.add_argument("--seed", type=int, default=0,
                            help="seed for random inputs (default 0)" if random_fallback else
                            "seed of the random parts, e.g. attack restarts (default 0)")


def parse_deltas(text: str) -> list[float]:
    """`0.05`, `8/255` or a comma-separated list of them; every value finite and >= 0."""
    values = []
    for part in text.split(","):
        item = part.strip()
        try:
            value = float(Fraction(item)) if "/" in item else float(item)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--delta: {item!r} is not a number or a fraction like 8/255") from None
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--delta: every budget must be finite and >= 0 (got {item})")
        values.append(value)
    return sorted(set(values))


def parse_p(text: str) -> float:
    """The Wasserstein order: a real >= 1 or `inf`."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--p: {text!r} is not a number (give a real >= 1 or inf)") from None
    if not value >= 1:
        raise UsageError(f"--p must be >= 1 or inf (got {text})")
    return value


def parse_box(text: str | None) -> tuple[float, float] | None:
    """`LOW,HIGH` (e.g. `0,1`) or None."""
    if text is None or text.strip().lower() == "none":
        return None
    parts = text.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise UsageError(f"--box: {text!r} must be two numbers LOW,HIGH (e.g. 0,1)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"--box needs finite LOW < HIGH (got {text})")
    if not math.isfinite(high - low):
        raise UsageError(f"--box: the width HIGH - LOW overflows a float64 (got {text}); give a narrower box")
    return low, high


def _add_budget(parser: argparse.ArgumentParser, default_delta: str, default_norm: str) -> None:
    parser.add_argument("--p", type=str, default="2", help="Wasserstein order: a real >= 1 or inf (default 2)")
    parser.add_argument("--norm", default=default_norm, help=f"threat norm inf, 2 or 1 (default {default_norm})")
    parser.add_argument("--delta", default=default_delta,
                        help=f"budget(s): decimals or fractions, comma-separated (default {default_delta})")
    parser.add_argument("--loss", default="ce", help="ce, margin, zero_one or dlr (default ce)")
    parser.add_argument("--box", default=None, metavar="LOW,HIGH", help="input domain, e.g. 0,1 (default: none)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="torch device (default auto: CUDA when available)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (`verifier: error: ...`, exit 2) instead of a usage block."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        hint = f" (see {self.prog} --help)"
        print(f"verifier: error: {' '.join(message.split())}{hint}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _add_time_limit(parser: argparse.ArgumentParser, result: str) -> None:
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help=f"stop after S seconds, counted from the command's start ({result}); checked "
                             "inside bound propagation and every attack step, so the command ends within "
                             "1.1*S + 5 s (measured; see docs/cli.md)")


def _deadline(args: argparse.Namespace):
    """The `Deadline` of --time-limit, counted from the command's start (NEVER without one)."""
    from verifier.deadline import NEVER, Deadline

    if args.time_limit is None:
        return NEVER
    if not args.time_limit > 0:
        raise UsageError(f"the time limit must be > 0 seconds (got {args.time_limit})")
    return Deadline(at=args.started + args.time_limit, clock=time.monotonic)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _OneLineParser(prog="verifier", description="Robustness verifier for ONNX models.")
    parser.add_argument("--version", action="version", version=f"verifier {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="model specs, op histogram, activation sites, family")
    _add_model(inspect)
    _add_output(inspect)
    _add_json(inspect)
    inspect.set_defaults(run=_run_inspect)

    validate = commands.add_parser("validate", help="check the torch conversion against onnxruntime")
    _add_model(validate)
    _add_output(validate)
    _add_data(validate, random_fallback=True)
    validate.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    validate.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    _add_device(validate)
    _add_json(validate)
    validate.set_defaults(run=_run_validate)

    certify = commands.add_parser("certify", help="upper bounds on the Wasserstein robust risk (certificates)")
    _add_model(certify)
    _add_output(certify)
    _add_data(certify, seed=False)  # certify is deterministic
    _add_budget(certify, default_delta="8/255", default_norm="inf")  # the same defaults as attack
    certify.add_argument("--grid-points", type=int, default=24, help="radius grid size (default 24)")
    certify.add_argument("--save-distributions", metavar="OUT.npz",
                         help="save each delta's realising distribution (atoms, weights, source)")
    _add_time_limit(certify, "exit 3 and no result")
    _add_json(certify)  # certificates are computed in float64 on the CPU (no --device)
    certify.set_defaults(run=_run_certify)

    attack = commands.add_parser("attack", help="Wasserstein distributional attacks (lower bounds)")
    _add_model(attack)
    _add_output(attack)
    _add_data(attack)
    _add_budget(attack, default_delta="8/255", default_norm="inf")
    attack.add_argument("--method", default="all",
                        help="wdapp, wda, pgd, wpgd, wda-curve, a comma-separated list, or all (default all)")
    attack.add_argument("--kappa", type=float, default=1.0, help="WDA mixture: move 1/kappa of the mass (default 1)")
    attack.add_argument("--steps", type=int, default=None, help="ascent steps per attack (default: per method)")
    attack.add_argument("--topk", type=int, default=9, help="WDA: wrong classes probed (default 9)")
    attack.add_argument("--save-adversarial", metavar="OUT.npz",
                        help="save every (method, delta) distribution: atoms, weights, source")
    _add_time_limit(attack, "exit 3 and no result")
    _add_device(attack)
    _add_json(attack)
    attack.set_defaults(run=_run_attack)

    audit = commands.add_parser("audit", help="inspect, validate, certify, attack and write a report")
    _add_model(audit)
    _add_output(audit)
    _add_data(audit)
    _add_budget(audit, default_delta="1/255,2/255,4/255,8/255", default_norm="inf")
    audit.add_argument("--attacks", default="wdapp,wda,pgd,wpgd",
                       help="comma-separated attack methods, or all (default wdapp,wda,pgd,wpgd)")
    audit.add_argument("--out", default="verifier-report", metavar="DIR",
                       help="report folder (default ./verifier-report)")
    audit.add_argument("--max-risk", type=float, metavar="X", help="fail unless the certificate is <= X at every delta")
    audit.add_argument("--min-certified-accuracy", type=float, metavar="A",
                       help="fail unless the certified accuracy is >= A at every delta")
    audit.add_argument("--min-robust-accuracy", type=float, metavar="A",
                       help="fail if an attack drives the accuracy below A (and no certificate proves it)")
    _add_time_limit(audit, "a partial report, exit 3")
    audit.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_device(audit)
    _add_json(audit)
    audit.set_defaults(run=_run_audit)
    return parser


def _run_inspect(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.summary import inspect_model

    summary = inspect_model(args.model, args.output, _memory_limit(args))
    if summary.unsupported_message is None:
        return EXIT_OK, summary.to_dict(), summary.to_text()
    print(f"verifier: error: {summary.unsupported_message}", file=sys.stderr)
    payload = {**summary.to_dict(), "error": summary.unsupported_message, "error_type": "UnsupportedOpsError"}
    return EXIT_BAD_INPUT, payload, summary.to_text()


def _run_validate(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.convert import convert_model
    from verifier.data import load_samples, random_samples
    from verifier.onnx_io import load_model
    from verifier.validate import validate_against_onnxruntime

    if args.atol < 0 or args.rtol < 0:
        raise UsageError("--atol and --rtol must be >= 0")
    limit = _memory_limit(args)
    loaded = load_model(args.model, limit)
    spec = loaded.info.data_input
    if args.data:
        samples = load_samples(args.data, spec, args.samples, limit)
    else:
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
        samples = random_samples(spec, args.samples or fixed or 64, seed=args.seed, memory_limit_bytes=limit)
    converted = convert_model(loaded, args.output)
    report = validate_against_onnxruntime(loaded, converted, samples.x, args.atol, args.rtol, args.device, samples.y)
    payload = {"model": args.model, "data": samples.source, **report.to_dict(), "head": _head(converted),
               "batch": converted.batch.to_dict()}
    lines = [
        f"model      {args.model}",
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
    """The model (loaded and converted) and labelled samples from --data."""
    from verifier.convert import convert_model
    from verifier.data import load_samples
    from verifier.onnx_io import load_model

    if not args.data:
        raise UsageError("--data FILE.npz with inputs x and labels y is required")
    limit = _memory_limit(args)
    loaded = load_model(args.model, limit)
    samples = load_samples(args.data, loaded.info.data_input, args.samples, limit)
    if samples.y is None:
        raise UsageError(f"{args.data} has no labels 'y'; certificates and attacks need them")
    return loaded, convert_model(loaded, args.output), samples


def _head(converted) -> dict:
    """Which output the logits come from, and how (`verifier.head.Head.to_dict`)."""
    return converted.head.to_dict()


def _refuse_folder(path: str | None) -> None:
    """Refuse an output file that is a folder before any work."""
    if path is not None and Path(path).is_dir():
        raise UsageError(f"cannot write {path}: it is a folder (give a file name ending in .npz)")


def _run_certify(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.certify.certificate import certify, save_distributions
    from verifier.data import fit_box
    from verifier.graph import json_safe

    deltas, p, box = parse_deltas(args.delta), parse_p(args.p), parse_box(args.box)
    if args.grid_points < 2:
        raise UsageError("--grid-points must be at least 2")
    _refuse_folder(args.save_distributions)
    deadline = _deadline(args)
    loaded, converted, samples = _labelled_samples(args)
    box = fit_box(samples.x, box, samples.source)
    result = certify(converted, samples.x, samples.y, deltas, p=p, norm=args.norm, loss=args.loss, box=box,
                     grid_points=args.grid_points, progress=_progress_wanted(args), deadline=deadline)
    if args.save_distributions:
        save_distributions(result, args.save_distributions)
    payload = {"model": args.model, "data": samples.source, **result.to_dict(), "head": _head(converted)}
    return EXIT_OK, json_safe(payload), f"head: {converted.head.reason}\n{result.to_text()}"


def _run_attack(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.attacks import attack, save_adversarial
    from verifier.data import fit_box
    from verifier.graph import json_safe

    deltas, p, box = parse_deltas(args.delta), parse_p(args.p), parse_box(args.box)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    _refuse_folder(args.save_adversarial)
    deadline = _deadline(args)
    loaded, converted, samples = _labelled_samples(args)
    box = fit_box(samples.x, box, samples.source)
    report = attack(converted, loaded, samples.x, samples.y, methods, deltas, p=p, norm=args.norm, loss=args.loss,
                    box=box, steps=args.steps, kappa=args.kappa, topk=args.topk, seed=args.seed,
                    device=args.device, progress=_progress_wanted(args), deadline=deadline)
    if args.save_adversarial:
        save_adversarial(report, args.save_adversarial)
    payload = {"model": args.model, "data": samples.source, **report.to_dict(), "head": _head(converted)}
    return EXIT_OK, json_safe(payload), f"head: {converted.head.reason}\n{report.to_text()}"


def _run_audit(args: argparse.Namespace) -> tuple[int, dict, str]:
    from verifier.audit import AuditSettings, Thresholds, audit

    if not args.data:
        raise UsageError("--data FILE.npz with inputs x and labels y is required")
    settings = AuditSettings(
        deltas=tuple(parse_deltas(args.delta)), p=parse_p(args.p), norm=args.norm, loss=args.loss,
        attacks=tuple(m.strip() for m in args.attacks.split(",") if m.strip()), box=parse_box(args.box),
        samples=args.samples, seed=args.seed, device=args.device, time_limit=args.time_limit, output=args.output,
        thresholds=Thresholds(args.max_risk, args.min_certified_accuracy, args.min_robust_accuracy),
        memory_limit=_memory_limit(args))
    progress = _progress_wanted(args)

    def announce(stage: str) -> None:
        if progress:
            print(f"verifier audit: {stage} ...", file=sys.stderr, flush=True)

    outcome = audit(args.model, args.data, settings, args.out, on_stage=announce, progress=progress,
                    started=args.started)
    return outcome.exit_code, outcome.report, _audit_text(outcome)


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


def _progress_wanted(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("onnxscript", "onnx_ir", "torch", "onnx2torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """`--box -1,1` as `--box=-1,1`: argparse takes a value starting with `-` for an option unless it
    is one plain negative number, so boxes and lists of negative numbers are joined to their option."""
    joined: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        following = items[index + 1] if index + 1 < len(items) else ""
        if (item.startswith("--") and "=" not in item and len(following) > 1 and following[0] == "-"
                and (following[1].isdigit() or following[1] == ".")):
            joined.append(f"{item}={following}")
            index += 2
            continue
        joined.append(item)
        index += 1
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `verifier` console script; returns the exit code."""
    started = time.monotonic()  # a time limit counts from here: loading torch & co. is part of the run
    parser = build_parser()
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    args.started = started
    _quiet_libraries()
    run: Callable[[argparse.Namespace], tuple[int, dict, str]] = args.run
    try:
        code, payload, text = run(args)
    except VerifierError as err:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(err), "error_type": type(err).__name__}))
        print(f"verifier: error: {err}", file=sys.stderr)
        return err.exit_code
    except Stopped as err:  # certify / attack --time-limit: no partial result (audit writes a partial report)
        message = f"{args.command} {err} after {args.time_limit:g} s; no result"
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "error_type": "Stopped"}))
        print(f"verifier: time limit hit: {message}", file=sys.stderr)
        return EXIT_TIME_LIMIT
    except KeyboardInterrupt:
        print("verifier: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug must still end in one readable line
        print(f"verifier: internal error (please report): {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_INTERNAL
    print(json.dumps(payload, indent=2) if args.json else text)
    return code


if __name__ == "__main__":
    sys.exit(main())
