"""Options of the `verifier` command line: shared option groups, value parsers, one-line errors.

`verifier.cli` builds the subcommands from these; every parser here turns a bad value into a
`UsageError` (one line, exit 2), and `OneLineParser` does the same for argparse's own errors.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from fractions import Fraction

from verifier.errors import UsageError

def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="path to the ONNX model")
    parser.add_argument("--memory-limit", metavar="SIZE", default=None,
                        help="refuse work that would need more memory than SIZE, e.g. 8G or 512M "
                             "(default: half of the memory available at start)")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback behind an error (with the one-line message)")


def memory_limit(args: argparse.Namespace) -> int | None:
    from verifier.resources import parse_size

    return None if args.memory_limit is None else parse_size(args.memory_limit)


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="NAME", default=None,
                        help="the graph output that is the classifier head (default: the first float output "
                             "that is not a pass-through of the input; `inspect` lists them)")


def add_perturb(parser: argparse.ArgumentParser) -> None:
    """`--perturb NAME`: the perturbed input of several, or a float tensor inside the graph."""
    parser.add_argument("--perturb", metavar="NAME", default=None,
                        help="the input or internal float tensor to perturb (default: the only input); other "
                             "inputs are held fixed, read per sample from the data file by name; an internal "
                             "tensor cuts the model there (`inspect` lists candidates)")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_data(parser: argparse.ArgumentParser, random_fallback: bool = False, seed: bool = True) -> None:
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


def parse_normalisation(mean: str | None, std: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """`--mean M1,..` and `--std S1,..` as two equally long tuples (std > 0), or None without them."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise UsageError("--mean and --std go together (per-channel values, e.g. --mean 0.485,0.456,0.406 "
                         "--std 0.229,0.224,0.225)")
    values = []
    for option, text in (("--mean", mean), ("--std", std)):
        try:
            values.append(tuple(float(part) for part in text.split(",")))
        except ValueError:
            raise UsageError(f"{option}: {text!r} must be comma-separated numbers") from None
    if len(values[0]) != len(values[1]):
        raise UsageError(f"--mean has {len(values[0])} values and --std {len(values[1])}; give one per channel")
    if not all(math.isfinite(v) for v in values[0]) or not all(math.isfinite(v) and v > 0 for v in values[1]):
        raise UsageError("--mean needs finite values and --std finite values > 0")
    return values[0], values[1]


def add_budget(parser: argparse.ArgumentParser, default_delta: str, default_norm: str) -> None:
    parser.add_argument("--p", type=str, default="2", help="Wasserstein order: a real >= 1 or inf (default 2)")
    parser.add_argument("--norm", default=default_norm, help=f"threat norm inf, 2 or 1 (default {default_norm})")
    parser.add_argument("--delta", default=default_delta,
                        help=f"budget(s): decimals or fractions, comma-separated (default {default_delta})")
    parser.add_argument("--loss", default="ce", help="ce, margin, zero_one or dlr (default ce)")
    parser.add_argument("--box", default=None, metavar="LOW,HIGH", help="input domain, e.g. 0,1 (default: none)")
    parser.add_argument("--mean", default=None, metavar="M1,M2,...",
                        help="per-channel mean of a normalised input (with --std): the box is "
                             "((LOW - mean) / std, (HIGH - mean) / std) per channel, LOW,HIGH from --box "
                             "(default 0,1)")
    parser.add_argument("--std", default=None, metavar="S1,S2,...", help="per-channel std (with --mean)")


def add_tolerances(parser: argparse.ArgumentParser) -> None:
    """`--atol`/`--rtol` of the conversion check (torch vs onnxruntime, elementwise)."""
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="absolute tolerance of the torch-vs-onnxruntime check (default 1e-5)")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="relative tolerance of the torch-vs-onnxruntime check (default 1e-5)")


def tolerances(args: argparse.Namespace) -> tuple[float, float]:
    """(`--atol`, `--rtol`), both checked >= 0."""
    if not (args.atol >= 0 and args.rtol >= 0):
        raise UsageError("--atol and --rtol must be >= 0")
    return args.atol, args.rtol


def add_exact(parser: argparse.ArgumentParser) -> None:
    """`--exact auto|on|split|off`: the MILP / branch-and-bound route for ReLU nets (method §8)."""
    parser.add_argument("--exact", choices=("auto", "on", "split", "off"), default="auto",
                        help="exact worst margins by MILP at the curve points the certificate uses: small ReLU "
                             "nets, norm inf or 1 (auto: only when cheap, ReLU splitting where a MILP is too big; "
                             "split: ReLU-splitting branch and bound only; default auto)")


def add_optimise_slopes(parser: argparse.ArgumentParser) -> None:
    """`--optimise-slopes`: alpha-CROWN style search of the relaxations' free slopes (method §7)."""
    parser.add_argument("--optimise-slopes", action="store_true",
                        help="tighter margin bounds: search the relaxations' free parameters by projected "
                             "gradient (alpha-CROWN style: ReLU-family and MaxPool slopes, the product planes' "
                             "mixing weights and exp/reciprocal/rsqrt/square tangent points; several times "
                             "slower; default off)")
    parser.add_argument("--optimise-intermediate", action="store_true",
                        help="with the slope search (implies --optimise-slopes), also re-bound every later "
                             "unstable node's input with its own parameters at each step (tighter again, far slower)")


def optimise_mode(args: argparse.Namespace) -> str | None:
    """The slope search `--optimise-slopes` / `--optimise-intermediate` ask for: None, "final" or "intermediate"."""
    if args.optimise_intermediate:
        return "intermediate"
    return "final" if args.optimise_slopes else None


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="torch device (default auto: CUDA when available)")


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (`verifier: error: ...`, exit 2) instead of a usage block."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        hint = f" (see {self.prog} --help)"
        print(f"verifier: error: {' '.join(message.split())}{hint}", file=sys.stderr)
        sys.exit(UsageError.exit_code)


def add_time_limit(parser: argparse.ArgumentParser, result: str) -> None:
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help=f"stop after S seconds, counted from the command's start ({result}); checked "
                             "inside bound propagation and every attack step, so the command ends within "
                             "1.1*S + 5 s (measured; see docs/cli.md)")


def add_block_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=256, metavar="B",
                        help="samples per block of work (default 256); under torchrun every rank takes whole "
                             "blocks, and results are bit-identical for any number of processes at the same B "
                             "(docs/scale.md)")


def deadline(args: argparse.Namespace):
    """The `Deadline` of --time-limit, counted from the command's start (NEVER without one)."""
    from verifier.deadline import Deadline

    if args.time_limit is not None and not args.time_limit > 0:
        raise UsageError(f"the time limit must be > 0 seconds (got {args.time_limit})")
    return Deadline.after(args.time_limit, started=args.started)


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
