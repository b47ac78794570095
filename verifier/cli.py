"""`verifier` command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 a check failed (e.g. the conversion does not match onnxruntime),
2 bad input or usage (one line on stderr, no traceback), 3 the time limit was hit, 4 internal
error (a bug: please report), 143 stopped by SIGTERM. The options and value parsers live in
`verifier.cli_options`, what each command does in `verifier.cli_commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence

from verifier import __version__
from verifier.allocator import keep_freed_memory
from verifier.cli_options import (OneLineParser, add_block_size, add_budget, add_data, add_device, add_exact, add_json,
                                  add_model, add_optimise_slopes, add_output, add_perturb, add_time_limit,
                                  add_tolerances, attach_negative_values)
from verifier.deadline import Stopped, Terminated, terminated_cause
from verifier.errors import VerifierError

from verifier.cli_commands import (EXIT_INTERNAL, EXIT_TERMINATED, EXIT_TIME_LIMIT, _run_attack, _run_audit,
                                   _run_certify, _run_inspect, _run_validate, _run_vnnlib)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = OneLineParser(prog="verifier", description="Robustness verifier for ONNX models.")
    parser.add_argument("--version", action="version", version=f"verifier {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="model specs, op histogram, activation sites, family")
    add_model(inspect)
    add_output(inspect)
    add_json(inspect)
    inspect.set_defaults(run=_run_inspect)

    validate = commands.add_parser("validate", help="check the torch conversion against onnxruntime")
    add_model(validate)
    add_output(validate)
    add_perturb(validate)
    add_data(validate, random_fallback=True)
    add_tolerances(validate)
    add_device(validate)
    add_json(validate)
    validate.set_defaults(run=_run_validate)

    certify = commands.add_parser("certify", help="upper bounds on the Wasserstein robust risk (certificates)")
    add_model(certify)
    add_output(certify)
    add_perturb(certify)
    add_data(certify, seed=False)  # certify is deterministic
    add_budget(certify, default_delta="8/255", default_norm="inf")  # the same defaults as attack
    certify.add_argument("--grid-points", type=int, default=24, help="radius grid size (default 24)")
    add_exact(certify)
    add_optimise_slopes(certify)
    certify.add_argument("--save-distributions", metavar="OUT.npz",
                         help="save each delta's realising distribution (atoms, weights, source)")
    add_time_limit(certify, "refinements stop at 80%% of it, listed in fallbacks; exit 3 and no result only if the coarse certificate does not fit")
    add_block_size(certify)
    add_device(certify)  # bounds, cells and Jacobians there; the tables and aggregation on the CPU
    add_json(certify)
    certify.set_defaults(run=_run_certify)

    attack = commands.add_parser("attack", help="Wasserstein distributional attacks (lower bounds)")
    add_model(attack)
    add_output(attack)
    add_perturb(attack)
    add_data(attack)
    add_budget(attack, default_delta="8/255", default_norm="inf")
    attack.add_argument("--method", default="all",
                        help="wdapp, wda, pgd, wpgd, wda-curve, a comma-separated list, or all (default all)")
    attack.add_argument("--kappa", type=float, default=1.0, help="WDA mixture: move 1/kappa of the mass (default 1)")
    attack.add_argument("--steps", type=int, default=None, help="ascent steps per attack (default: per method)")
    attack.add_argument("--topk", type=int, default=9, help="WDA: wrong classes probed (default 9)")
    attack.add_argument("--save-adversarial", metavar="OUT.npz",
                        help="save every (method, delta) distribution: atoms, weights, source")
    add_time_limit(attack, "each method gets an equal share and returns its best points so far, flagged time-limited; exit 3 and no result only if a replay does not fit")
    add_block_size(attack)
    add_device(attack)
    add_json(attack)
    attack.set_defaults(run=_run_attack)

    audit = commands.add_parser("audit", help="inspect, validate, certify, attack and write a report")
    add_model(audit)
    add_output(audit)
    add_perturb(audit)
    add_data(audit)
    add_budget(audit, default_delta="1/255,2/255,4/255,8/255", default_norm="inf")
    audit.add_argument("--attacks", default="wdapp,wda,pgd,wpgd",
                       help="comma-separated attack methods, or all (default wdapp,wda,pgd,wpgd)")
    audit.add_argument("--grid-points", type=int, default=24, help="radius grid size of the certificates (default 24)")
    audit.add_argument("--out", default="verifier-report", metavar="DIR",
                       help="report folder (default ./verifier-report)")
    audit.add_argument("--max-risk", type=float, metavar="X", help="fail unless the certificate is <= X at every delta")
    audit.add_argument("--min-certified-accuracy", type=float, metavar="A",
                       help="fail unless the certified accuracy is >= A at every delta")
    audit.add_argument("--min-robust-accuracy", type=float, metavar="A",
                       help="fail if an attack drives the accuracy below A (and no certificate proves it)")
    add_exact(audit)
    add_optimise_slopes(audit)
    add_tolerances(audit)
    add_time_limit(audit, "certify and each attack get shares and return their best so far; a partial report, exit 3, only if a stage does not fit")
    add_block_size(audit)
    audit.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_device(audit)
    add_json(audit)
    audit.set_defaults(run=_run_audit)

    vnnlib = commands.add_parser("vnnlib", help="decide a VNN-LIB property: sat (counterexample), unsat, unknown")
    add_model(vnnlib)
    vnnlib.add_argument("property", metavar="PROP.vnnlib", help="the property (VNN-COMP's VNN-LIB subset)")
    add_output(vnnlib)
    vnnlib.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="answer timeout after S seconds (exit 3)")
    vnnlib.add_argument("--counterexample", metavar="FILE", default=None,
                        help="write VNN-COMP's result file (sat with the assignment, or the status) to FILE")
    add_json(vnnlib)
    vnnlib.set_defaults(run=_run_vnnlib)
    return parser


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("onnxscript", "onnx_ir", "torch", "onnx2torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `verifier` console script; returns the exit code."""
    started = time.monotonic()  # a time limit counts from here: loading torch & co. is part of the run
    parser = build_parser()
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    args.started = started
    _quiet_libraries()
    keep_freed_memory()  # freed tensors are reused instead of page-faulted in again (verifier.allocator)
    run: Callable[[argparse.Namespace], tuple[int, dict, str]] = args.run
    json_wanted, debug = getattr(args, "json", False), getattr(args, "debug", False)
    args.job = None
    try:
        with _stop_on_termination():
            if hasattr(args, "block_size"):  # certify, attack, audit: alone or one rank of a torchrun job
                from verifier.distributed import Job

                args.job = Job.start(args.block_size, args.time_limit)
            code, payload, text = run(args)
            if args.job is not None:
                args.job.finish()
    except BaseException as err:  # noqa: BLE001 - every failure ends in one line (rank 0 speaks for all)
        err = terminated_cause(err) or err  # a signal re-raised by library code as another error
        if args.job is not None:
            args.job.share(err)
        code = _failure(err, args, json_wanted, debug)
        _leave(args.job)
        return code
    _leave(args.job)
    if args.job is not None and not args.job.writer:
        return code
    try:
        print(json.dumps(payload, indent=2) if json_wanted else text, flush=True)
    except BrokenPipeError:  # `verifier ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def entry() -> None:
    """The `verifier` console script and `python -m verifier`: `main`, then the process ends with its code."""
    end_process(main())


def end_process(code: int) -> None:
    """End this process with `code`. A torchrun rank skips the interpreter's teardown (`os._exit`, after
    flushing): the C++ threads of gloo and of rank 0's rendezvous store can abort the process there
    (SIGABRT, "terminate called without an active exception") after the result is already out."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def _leave(job) -> None:
    if job is not None and job.world > 1:
        from verifier.distributed import leave

        leave()


def _failure(err: BaseException, args: argparse.Namespace, json_wanted: bool, debug: bool) -> int:
    """The exit code of a failure, and its one line (in a torchrun job only rank 0's line is printed:
    another rank's failure reaches it through the next collective and is named there)."""
    from verifier.distributed import CollectiveError

    quiet = args.job is not None and not args.job.writer and not isinstance(err, CollectiveError)
    fail = _silent if quiet else _fail
    if isinstance(err, VerifierError):
        return fail(err.exit_code, f"verifier: error: {err}", str(err), type(err).__name__, json_wanted, debug)
    if isinstance(err, Terminated):
        return fail(EXIT_TERMINATED, f"verifier: {err}; no result", str(err), "Terminated", json_wanted, debug)
    if isinstance(err, Stopped):  # certify / attack --time-limit: no partial result (audit writes a partial report)
        message = f"{args.command} {err} after {args.time_limit:g} s; no result"
        return fail(EXIT_TIME_LIMIT, f"verifier: time limit hit: {message}", message, "Stopped", json_wanted, debug)
    if isinstance(err, KeyboardInterrupt):
        return fail(130, "verifier: interrupted", None, "KeyboardInterrupt", False, False)
    if not isinstance(err, Exception):  # SystemExit and the like
        raise err
    line = f"verifier: internal error (please report): {type(err).__name__}: {err}"
    line += "" if debug else " (--debug shows the traceback)"
    return fail(EXIT_INTERNAL, " ".join(line.split())[:2000], None, type(err).__name__, False, debug)


def _silent(code: int, *_details) -> int:
    """A failure another rank reports: the exit code only."""
    return code


def _fail(code: int, line: str, message: str | None, kind: str, json_wanted: bool, debug: bool) -> int:
    """Report a failure: the traceback first with --debug, then one line on stderr (and, with --json,
    an error object on stdout, marked incomplete)."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    if json_wanted and message is not None:
        print(json.dumps({"error": message, "error_type": kind, "complete": False}))
    print(line, file=sys.stderr)
    return code


@contextlib.contextmanager
def _stop_on_termination():
    """SIGTERM/SIGHUP raise `Terminated` in the main thread: certify and attack stop with one line,
    an audit in its certify or attack stage writes its partial report (exit 3)."""
    def handler(number, _frame):
        raise Terminated(f"stopped by {signal.Signals(number).name}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


if __name__ == "__main__":
    entry()
