"""Scale-out on torch.distributed: which samples a process owns, and the gathers of the global steps.

`torchrun --nproc-per-node K -m verifier audit ...` starts K copies of the command; each reads
the torchrun environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, ...), joins one
process group (gloo for the CPU tables; nccl besides it on CUDA, one device per rank) and owns a
contiguous `Shard` of the samples made of whole blocks of `block` samples. Per-sample work
(growth evidence, cell radii, flip distances, attack points) runs on the local shard; the global
steps (the dual over lambda, the knapsacks, means over the sample) run on every rank on tables
that `Shard.gather` concatenates in sample order, so they compute exactly what one process
computes. Bit-for-bit equality with one process also needs every batched computation to see the
same rows: certify works block by block on blocks aligned to global sample indices, and the
attacks run their forward passes on fixed-size padded chunks (docs/scale.md).

Failures stay collective: every gather also exchanges each rank's status, and a rank that
fails or stops (`--time-limit`) calls `Shard.share(err)`, which is matched by the gather the
others wait in: they raise `PeerFailed` (exit 2, one line naming the rank) or `PeerStopped`,
so nobody hangs. A single process has `Shard.whole(n)`: every gather is the identity and
torch.distributed is never touched.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from verifier.deadline import Stopped
from verifier.errors import UsageError, VerifierError

if TYPE_CHECKING:  # torch is imported where a collective runs: a refused command never loads it
    import torch

BLOCK = 256  # samples per block: results are identical for every process count at the same block size
DEFAULT_TIMEOUT_S = 1800.0  # how long a collective waits for the slowest rank (torch's own default)
TIMEOUT_VARIABLE = "VERIFIER_COLLECTIVE_TIMEOUT"


class PeerFailed(VerifierError):
    """Another rank failed: this rank stops too (exit 2, one line naming that rank and its error)."""


class PeerStopped(Stopped):
    """Another rank hit the time limit (or a signal): this rank stops at the same point."""


class CollectiveError(VerifierError):
    """A collective could not complete (a rank vanished, the timeout passed, the rendezvous failed)."""


@dataclass(frozen=True)
class Shard:
    """Samples `[start, stop)` of `total`, owned by rank `rank` of `world` (one process: all of them)."""

    total: int
    start: int = 0
    stop: int = -1  # -1: total
    rank: int = 0
    world: int = 1
    block: int = BLOCK
    group: Any = field(default=None, compare=False, repr=False)  # torch.distributed process group

    @classmethod
    def whole(cls, total: int, block: int = BLOCK) -> Shard:
        """Every sample in this process (gathers are the identity)."""
        return cls(total=int(total), stop=int(total), block=block)

    @classmethod
    def of_rank(cls, total: int, rank: int, world: int, block: int = BLOCK, group: Any = None) -> Shard:
        """Rank `rank`'s share: whole blocks, split as evenly as blocks allow, in sample order."""
        blocks = math.ceil(total / block)
        first, last = rank * blocks // world, (rank + 1) * blocks // world
        return cls(total=int(total), start=min(first * block, total), stop=min(last * block, total), rank=rank,
                   world=world, block=block, group=group)

    @property
    def end(self) -> int:
        """The first sample after the shard."""
        return self.total if self.stop < 0 else self.stop

    @property
    def count(self) -> int:
        """Samples owned here."""
        return self.end - self.start

    @property
    def distributed(self) -> bool:
        """Whether other ranks share the work."""
        return self.world > 1

    def local(self, values):
        """The local rows of a per-sample array of all `total` samples."""
        return values[self.start:self.end]

    def blocks(self) -> list[slice]:
        """The local samples cut at multiples of `block` (global indices), as slices of the local rows."""
        cuts = list(range(self.start - self.start % self.block + self.block, self.end, self.block))
        edges = [self.start, *cuts, self.end]
        return [slice(a - self.start, b - self.start) for a, b in zip(edges, edges[1:]) if b > a]

    # -- collectives ---------------------------------------------------------------------------
    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor's rows from every rank, concatenated in rank (= sample) order, on the CPU."""
        if not self.distributed:
            return tensors
        import torch

        parts = self._exchange(("ok", tuple(t.detach().cpu() for t in tensors)))
        return tuple(torch.cat([part[i] for part in parts]) for i in range(len(tensors)))

    def gather_one(self, tensor: torch.Tensor) -> torch.Tensor:
        """`gather` of one tensor."""
        return self.gather(tensor)[0]

    def objects(self, value: Any) -> list[Any]:
        """One picklable value from every rank, in rank order (`[value]` in one process)."""
        return self._exchange(("ok", value)) if self.distributed else [value]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a decision every rank must take alike)."""
        return any(self.objects(bool(flag)))

    def share(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed or stopped (they are, or will be, in a gather)."""
        if not self.distributed or isinstance(error, (PeerFailed, PeerStopped, CollectiveError)):
            return
        kind = "stopped" if isinstance(error, Stopped) else "failed"
        try:
            self._exchange((kind, _one_line(error)), own_failure=True)
        except (PeerFailed, PeerStopped, CollectiveError):
            pass

    def _exchange(self, payload: tuple[str, Any], own_failure: bool = False) -> list[Any]:
        import torch.distributed as dist

        received: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(received, payload, group=self.group)
        except Exception as err:  # noqa: BLE001 - gloo/nccl raise RuntimeError subclasses of many kinds
            raise CollectiveError(f"rank {self.rank}: a collective with the other ranks failed "
                                  f"({_one_line(err)[:300]}); another rank probably died") from err
        if own_failure:
            return []
        for rank, (kind, body) in enumerate(received):
            if kind == "failed":
                raise PeerFailed(f"rank {rank} of {self.world} failed: {body}")
        for rank, (kind, body) in enumerate(received):
            if kind == "stopped":
                raise PeerStopped(f"{body} (on rank {rank} of {self.world})")
        return [body for _, body in received]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, (VerifierError, Stopped)) else f"{type(error).__name__}: {text}"


# -- torchrun --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`)."""

    rank: int
    world: int
    local_rank: int


def launched() -> Launch | None:
    """The torchrun environment of this process, or None when it was not started by torchrun (or K = 1)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except ValueError as err:
        raise CollectiveError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})") from err
    return launch if launch.world > 1 else None


def collective_timeout(time_limit: float | None) -> float:
    """Seconds a collective waits: `VERIFIER_COLLECTIVE_TIMEOUT`, else past any `--time-limit`, else 30 min."""
    given = os.environ.get(TIMEOUT_VARIABLE)
    if given:
        try:
            value = float(given)
        except ValueError as err:
            raise CollectiveError(f"{TIMEOUT_VARIABLE} must be a number of seconds (got {given!r})") from err
        if not value > 0:
            raise CollectiveError(f"{TIMEOUT_VARIABLE} must be > 0 (got {given!r})")
        return value
    return DEFAULT_TIMEOUT_S if time_limit is None else 1.1 * time_limit + 60.0


def join(launch: Launch, timeout_s: float) -> Any:
    """Join the job's process group (env:// rendezvous); returns the group our gathers use.

    The tables travel as CPU tensors, so they go over gloo; with CUDA, nccl is set up beside it and
    each rank takes the device of its local rank.
    """
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                                    world_size=launch.world, timeout=timedelta(seconds=timeout_s))
    except Exception as err:  # noqa: BLE001 - rendezvous errors come as many types
        raise CollectiveError(f"rank {launch.rank} could not join the other {launch.world - 1} rank(s): "
                              f"{_one_line(err)[:300]}") from err
    return dist.group.WORLD


def leave() -> None:
    """Leave the process group (after the last collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Job:
    """How one command runs: alone, or as rank `rank` of a torchrun job (a joined process group)."""

    block: int = BLOCK
    rank: int = 0
    world: int = 1
    group: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def start(cls, block: int = BLOCK, time_limit: float | None = None) -> Job:
        """This process's job: torchrun's environment joined (with the collective timeout), else alone."""
        if block < 1:
            raise UsageError(f"the block size must be >= 1 sample (got {block})")
        launch = launched()
        if launch is None:
            return cls(block=block)
        group = join(launch, collective_timeout(time_limit))
        return cls(block=block, rank=launch.rank, world=launch.world, group=group)

    @property
    def writer(self) -> bool:
        """Whether this process prints and writes the results (rank 0)."""
        return self.rank == 0

    def shard(self, total: int) -> Shard:
        """This process's samples of `total`; every rank needs at least one block."""
        if self.world == 1:
            return Shard.whole(total, self.block)
        blocks = math.ceil(total / self.block)
        if blocks < self.world:
            raise UsageError(f"{total} samples make {blocks} block(s) of {self.block}, fewer than the "
                                  f"{self.world} ranks: use --block-size {max(1, total // self.world)} or fewer ranks")
        return Shard.of_rank(total, self.rank, self.world, self.block, self.group)

    def _peers(self) -> Shard:
        return Shard(total=self.world, start=self.rank, stop=self.rank + 1, rank=self.rank, world=self.world,
                     group=self.group)

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is true on one."""
        return self._peers().any(flag) if self.world > 1 else bool(flag)

    def share(self, error: BaseException) -> None:
        """Tell the other ranks this one failed or stopped (see `Shard.share`)."""
        self._peers().share(error)

    def finish(self) -> None:
        """The last exchange: every rank got this far (a failure after the last gather is caught here)."""
        if self.world > 1:
            self._peers().objects(None)


__all__ = ["BLOCK", "CollectiveError", "Job", "Launch", "PeerFailed", "PeerStopped", "Shard", "collective_timeout",
           "join", "launched", "leave"]
