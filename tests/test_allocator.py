"""The command line's allocator setting: applied on glibc, left alone when the user set it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from verifier.allocator import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_are_set_on_glibc_unless_the_environment_sets_them(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert keep_freed_memory() is True
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False


_FREED_AND_RELEASED = """
import numpy as np
from verifier.allocator import keep_freed_memory, release_freed_memory

def resident_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20

assert keep_freed_memory()
blocks = [np.ones(1 << 17) for _ in range(400)]  # 400 blocks of 1 MiB, from the heap
del blocks[::2]  # 200 MiB freed between blocks still in use: kept resident by the thresholds
before = resident_mb()
assert release_freed_memory()
print(before - resident_mb())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_released_memory_leaves_the_process():
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                            "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", _FREED_AND_RELEASED], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    assert float(done.stdout) > 150  # of the 200 MiB freed (a fresh process: its allocator settings apart)


def test_release_frees_tensors_that_only_a_reference_cycle_keeps():
    """A stage's leftovers in reference cycles (fx modules, autograd graphs) go before the trim, not
    at the collector's next full pass: the attacks must not run beside certify's dead tensors."""
    import gc
    import weakref

    import torch

    from verifier.allocator import release_freed_memory

    class Holder:
        pass

    enabled = gc.isenabled()
    gc.disable()
    try:
        holder = Holder()
        holder.itself, holder.tensor = holder, torch.zeros(1000, dtype=torch.float64)
        alive = weakref.ref(holder.tensor)
        del holder
        assert alive() is not None  # refcounts alone cannot free a cycle
        release_freed_memory()
        assert alive() is None
    finally:
        if enabled:
            gc.enable()
