"""Sharded runs (verifier.distributed): 2 gloo processes give the JSON of one process, bit for bit;
a rank that fails ends both with exit 2 and one line."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import shipped_data, shipped_model

from verifier import cli
from verifier.distributed import Job, Shard
from verifier.errors import UsageError

SAMPLES, BLOCK = "8", "4"  # two blocks: one per rank


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _injected_failure(*_args, **_kwargs):
    raise UsageError("injected failure on this rank")


def _rank(rank: int, world: int, ports: list[int], runs: list[list[str]], folder: str, failing: int) -> None:
    """One torchrun-like worker: the environment torchrun sets, then `verifier` once per run, and the
    console script's end of the process (a C-level abort would show its Python stack on stderr)."""
    faulthandler.enable()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      VERIFIER_COLLECTIVE_TIMEOUT="180")  # a loaded box slows one rank
    torch.set_num_threads(1)
    if rank == failing:
        import verifier.certify.certificate as certificate

        certificate.block_tables = _injected_failure
    codes = []
    for index, argv in enumerate(runs):
        os.environ["MASTER_PORT"] = str(ports[index])
        stem = Path(folder) / f"{rank}-{index}"
        with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            codes.append(cli.main([*argv, "--samples", SAMPLES, "--block-size", BLOCK]))
    cli.end_process(max(codes))


def _spawn(runs: list[list[str]], folder: Path, failing: int = -1) -> list[int]:
    """Run both ranks to the end (a hang fails the test after 240 s); their exit codes."""
    ports = [_free_port() for _ in runs]
    context = mp.start_processes(_rank, args=(2, ports, runs, str(folder), failing), nprocs=2, join=False,
                                 start_method="spawn")
    for process in context.processes:
        process.join(240)
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "a rank hung"
    return [p.exitcode for p in context.processes]


def _single(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert cli.main([*argv, "--samples", SAMPLES, "--block-size", BLOCK]) == 0
    return capsys.readouterr().out


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in ("seconds", "timings", "generated_at")}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_two_ranks_give_the_json_of_one_process(tmp_path, capsys):
    gelu, gelu_data = str(shipped_model("mlp_gelu")), str(shipped_data("mlp_gelu"))
    relu, relu_data = str(shipped_model("mlp_relu")), str(shipped_data("mlp_relu"))
    budget = ["--p", "2", "--norm", "inf", "--box", "0,1", "--json"]
    grid = ["--grid-points", "4"]  # few radii: the test checks the plumbing, not the tightness
    runs = [
        ["certify", gelu, "--data", gelu_data, "--delta", "2/255,8/255", "--loss", "margin", *grid, *budget],
        ["attack", relu, "--data", relu_data, "--delta", "4/255,8/255", "--method", "all", "--steps", "8", *budget],
        ["audit", gelu, "--data", gelu_data, "--delta", "8/255", "--attacks", "wdapp,pgd", "--quiet", *grid,
         *budget, "--out", str(tmp_path / "sharded")],
    ]
    assert _spawn(runs, tmp_path) == [0, 0]
    alone = [json.loads(_single(argv, capsys)) for argv in runs[:2]]
    _single([*runs[2][:-1], str(tmp_path / "alone")], capsys)
    sharded = [json.loads((tmp_path / f"0-{i}.out").read_text()) for i in range(2)]
    assert sharded[0] == alone[0]  # certify: every number, certified radii and local slopes included
    assert _without_timing(sharded[1]) == _without_timing(alone[1])
    assert sharded[1]["samples"] == 8 and len(sharded[1]["results"]) == 10  # 5 methods x 2 deltas
    report = json.loads((tmp_path / "sharded" / "report.json").read_text())
    assert _without_timing(report) == _without_timing(json.loads((tmp_path / "alone" / "report.json").read_text()))
    # rank 1 printed and wrote nothing: rank 0 speaks for the job
    assert all((tmp_path / f"1-{i}.out").read_text() == "" for i in range(3))
    assert all((tmp_path / f"1-{i}.err").read_text() == "" for i in range(3))


def test_a_failing_rank_ends_both_with_exit_2_and_one_line(tmp_path):
    runs = [["certify", str(shipped_model("mlp_gelu")), "--data", str(shipped_data("mlp_gelu")), "--box", "0,1",
             "--grid-points", "2"]]
    assert _spawn(runs, tmp_path, failing=1) == [2, 2]
    lines = (tmp_path / "0-0.err").read_text().splitlines()
    assert lines == ["verifier: error: rank 1 of 2 failed: injected failure on this rank"]
    assert (tmp_path / "1-0.err").read_text() == ""  # the failing rank's line is rank 0's


def test_shards_are_whole_blocks_in_sample_order():
    shards = [Shard.of_rank(10, rank, 3, block=2) for rank in range(3)]
    assert [(s.start, s.end) for s in shards] == [(0, 2), (2, 6), (6, 10)]
    assert Shard(total=10, start=3, stop=9, block=4).blocks() == [slice(0, 1), slice(1, 5), slice(5, 6)]
    assert Shard.whole(5, block=2).blocks() == [slice(0, 2), slice(2, 4), slice(4, 5)]
    whole = Shard.whole(3)
    table = torch.arange(3.0)
    assert whole.gather(table)[0] is table and not whole.distributed


def test_too_few_blocks_for_the_ranks_is_refused():
    with pytest.raises(UsageError, match="8 samples make 1 block.* use --block-size 4"):
        Job(block=256, world=2).shard(8)


def _linear_target(x: torch.Tensor, y: torch.Tensor, shard: Shard | None):
    from verifier.attacks.base import Target

    torch.manual_seed(3)
    module = torch.nn.Linear(x.shape[1], 4).double()
    flat = x.flatten(1)
    return Target(module, x, y, "2", 2.0, "ce", torch.full_like(flat, -torch.inf), torch.full_like(flat, torch.inf),
                  shard=shard)


def test_search_draws_per_sample_whatever_the_shard_and_chunks(monkeypatch):
    """A rank's samples get the random starts and best iterates they get in one process, also when
    the search is cut into chunks at other rows (and a sample's rows fall in two chunks)."""
    import verifier.attacks.base as base

    x, y = torch.randn(10, 6, dtype=torch.float64), torch.arange(10) % 4
    whole = base.Attack(_linear_target(x, y, None), seed=5, topk=2)
    part = base.Attack(_linear_target(x[4:8], y[4:8], Shard(total=10, start=4, stop=8)), seed=5, topk=2)
    rows_whole, rows_part = whole.rows(3), part.rows(3)  # 3 rows per sample, sample-major
    radius_whole, radius_part = torch.full((30,), 0.5, dtype=torch.float64), torch.full((12,), 0.5, dtype=torch.float64)
    starts = whole.random_start(radius_whole, rows_whole)
    assert torch.equal(part.random_start(radius_part, rows_part), starts[12:24])
    for attack in (whole, part):  # 5 rows per chunk (ASCEND_COPIES float64 tensors of 6 inputs x 3 targets):
        object.__setattr__(attack.target, "working_bytes", 5 * base.ASCEND_COPIES * 8 * 6 * 3)  # chunks cut samples
    found_whole = whole.search(rows_whole, radius_whole, 3)
    found_part = part.search(rows_part, radius_part, 3)
    assert torch.equal(found_part.d, found_whole.d[12:24]) and torch.equal(found_part.flip, found_whole.flip[12:24])
    assert whole.runs == part.runs == 1 + 2 and whole.draws == part.draws
