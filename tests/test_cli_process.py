"""The CLI as a process: SIGTERM, a closed pipe, --debug, and what a refusal imports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import shipped_data, shipped_model

from verifier import cli


def _verifier(*argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "verifier", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _terminate_after(process: subprocess.Popen, seconds: float) -> None:
    """SIGTERM after `seconds` (the process must still be running: the test would prove nothing)."""
    time.sleep(seconds)
    assert process.poll() is None, "the command ended before the signal"
    process.send_signal(signal.SIGTERM)


def test_sigterm_during_audit_leaves_a_partial_report(tmp_path):
    out = tmp_path / "report"
    process = _verifier("audit", shipped_model("cnn"), "--data", shipped_data("cnn"), "--box", "0,1", "--out", out,
                        "--attacks", "wdapp,wda,pgd,wpgd", "--delta", "1/255,2/255,4/255,8/255", "--json")
    # the stage lines reach a pipe too: signal once certify has begun (it takes seconds on 360 CNN samples)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("verifier audit: certify"):
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            break
    stdout, rest = process.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert process.returncode == 3, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and report["stopped_at"] in {"certify", "attacks"}
    assert "audit stopped by SIGTERM" in report["warnings"]
    assert json.loads(stdout)["complete"] is False
    assert "Traceback" not in stderr


def test_sigterm_during_certify_is_one_line_and_incomplete_json():
    # the handler is installed when main() starts (well under a second); certify of 360 CNN samples on
    # a fine grid takes far longer than the 4 s
    process = _verifier("certify", shipped_model("cnn"), "--data", shipped_data("cnn"), "--box", "0,1", "--json",
                        "--grid-points", "48", "--delta", "1/255,2/255,4/255,8/255")
    _terminate_after(process, 4.0)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == cli.EXIT_TERMINATED, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["verifier: stopped by SIGTERM; no result"]
    assert json.loads(stdout) == {"error": "stopped by SIGTERM", "error_type": "Terminated", "complete": False}


def test_a_signal_that_library_code_rewraps_is_still_a_signal(capsys, monkeypatch):
    # CI saw SIGTERM land inside inspect.getfullargspec (called while torch imports), which re-raises
    # every exception as TypeError('unsupported callable'): that is a stop by the signal, not a bug
    import inspect

    import verifier.summary
    from verifier.deadline import Terminated

    def signalled(*_args, **_kwargs):
        raise Terminated("stopped by SIGTERM")

    def library_call(*_args, **_kwargs):
        odd = type("Odd", (), {"__signature__": property(signalled), "__call__": lambda self: None})
        inspect.getfullargspec(odd())

    monkeypatch.setattr(verifier.summary, "inspect_model", library_call)
    code = cli.main(["inspect", str(shipped_model("mlp_relu")), "--json"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_TERMINATED
    assert captured.err.strip() == "verifier: stopped by SIGTERM; no result"
    assert json.loads(captured.out) == {"error": "stopped by SIGTERM", "error_type": "Terminated", "complete": False}


def test_closed_pipe_is_not_a_traceback():
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    writer = subprocess.run([sys.executable, "-m", "verifier", "inspect", str(shipped_model("transformer")), "--json"],
                            stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=120)
    reader.stdin.close()
    reader.wait(timeout=30)
    assert "Traceback" not in writer.stderr and "BrokenPipe" not in writer.stderr
    assert writer.returncode == 0


def test_debug_shows_the_traceback_of_an_internal_error(capsys, monkeypatch):
    import verifier.summary

    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(verifier.summary, "inspect_model", broken)
    code = cli.main(["inspect", str(shipped_model("mlp_relu"))])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERNAL and "Traceback" not in err
    assert err.strip() == ("verifier: internal error (please report): ZeroDivisionError: a bug "
                           "(--debug shows the traceback)")
    code = cli.main(["inspect", str(shipped_model("mlp_relu")), "--debug"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERNAL and "Traceback (most recent call last)" in err and "broken" in err
    assert err.strip().splitlines()[-1] == "verifier: internal error (please report): ZeroDivisionError: a bug"


def test_debug_shows_the_traceback_of_a_refusal_too(capsys, tmp_path):
    code = cli.main(["certify", str(shipped_model("mlp_relu")), "--data", str(tmp_path / "none.npz"), "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().endswith("data file not found: " + str(tmp_path / "none.npz"))


@pytest.mark.parametrize("argv", [
    ["certify", "{model}", "--data", "{missing}"],
    ["attack", "{model}", "--data", "{missing}"],
    ["validate", "{model}", "--data", "{missing}"],
    ["certify", "{missing_model}", "--data", "{data}"],
])
def test_a_refusal_does_not_import_torch(tmp_path, argv):
    """Input checks run before the analysis modules are imported, so a refusal answers fast."""
    values = {"model": shipped_model("mlp_relu"), "data": shipped_data("mlp_relu"),
              "missing": tmp_path / "none.npz", "missing_model": tmp_path / "none.onnx"}
    args = [part.format(**values) for part in argv]
    probe = ("import sys; from verifier import cli; code = cli.main(%r); "
             "print(code, 'torch' in sys.modules, 'onnx2torch' in sys.modules)" % args)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_rank_ends_with_its_code_and_flushed_output(world):
    """end_process: a rank (WORLD_SIZE > 1) leaves through os._exit, so atexit never runs, yet what it
    printed arrives and the code is the command's; a lone process exits normally (atexit runs)."""
    script = ("import atexit, sys; from verifier.cli import end_process; atexit.register(print, 'atexit ran');"
              "print('result', end=''); sys.stderr.write('line'); end_process(3)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": world})
    assert done.returncode == 3 and done.stderr == "line"
    assert done.stdout == ("result" if world == "2" else "resultatexit ran\n")
