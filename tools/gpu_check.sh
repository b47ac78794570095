#!/usr/bin/env bash
# The one prepared check of the CUDA path, for when a GPU machine is lent (the `device` tool).
#
# Here, once, in the repository root (the wheel travels in an ignored folder named in `carry`):
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps onnx2torch==1.5.15 -d .whl
# Then one call of the device tool, about 6 minutes of device time:
#     run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
# and copy $OUT/gpu.md (it comes back with the reply) into docs/benchmarks.md ("CUDA path").
#
# What it does: the CUDA tests (tests/test_cuda.py: bounds, cells, certify and attacks on CUDA equal
# the CPU's), then the same `certify` and `attack --method pgd` on the shipped models with
# --device cpu and --device cuda, timed as whole commands, and a table of the ratios. The image's own
# python3 holds a CUDA build of torch (not the pinned 2.13.0 CPU wheel: its version is printed).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
$PY - <<'EOF' | tee "$OUT/gpu.md"
import torch
assert torch.cuda.is_available(), "no CUDA device seen by torch"
print(f"CUDA check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB\n")
EOF
set +e
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15 | tee "$OUT/tests.txt"
set -e
{ echo; echo "tests/test_cuda.py: $(tail -n 1 "$OUT/tests.txt")"; echo; } >> "$OUT/gpu.md"

$PY - "$OUT" <<'EOF' | tee -a "$OUT/gpu.md"
import json, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[1])
print("| model | command | cpu s | cuda s | cpu / cuda | exit cpu, cuda | certificate at 8/255 cpu, cuda |")
print("|---|---|---|---|---|---|---|")
for model in ("mlp_relu", "cnn", "transformer"):
    data = "models/digits_test.npz" if model.startswith("mlp") else "models/digits_test_image.npz"
    common = [f"models/digits_{model}.onnx", "--data", data, "--samples", "200", "--box", "0,1",
              "--delta", "1/255,2/255,4/255,8/255", "--json"]
    for command, extra in (("certify", []), ("pgd", ["--method", "pgd"])):
        runs = {}
        for device in ("cpu", "cuda"):
            argv = [sys.executable, "-m", "verifier", "certify" if command == "certify" else "attack",
                    *common, *extra, "--device", device]
            began = time.monotonic()
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=150)
                status, stdout = done.returncode, done.stdout
                (out / f"{command}-{model}-{device}.err").write_text(done.stderr[-4000:])
            except subprocess.TimeoutExpired:
                status, stdout = "timeout", ""
            wall = time.monotonic() - began
            try:
                certificate = json.loads(stdout)["results"][-1].get("certificate")
            except (ValueError, KeyError, IndexError, TypeError):
                certificate = None
            runs[device] = (wall, status, certificate)
        (cpu, a, ca), (cuda, b, cb) = runs["cpu"], runs["cuda"]
        certs = f"{ca}, {cb}" if command == "certify" else "-"
        print(f"| {model} | {command} | {cpu:.1f} | {cuda:.1f} | {cpu / cuda:.2f} | {a}, {b} | {certs} |", flush=True)
print("\n200 samples, W_2, l_inf, CE, deltas 1-8/255, whole commands (imports included), one run each.")
EOF
