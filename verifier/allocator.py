"""How the process's C allocator treats freed memory (a setting of the command line, not the library).

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB) with
a fresh `mmap` and hands it back to the kernel when freed, and trims the heap's free top the same
way; the next block of that size is page-faulted in and zeroed again. Bound propagation allocates
and frees tensors of megabytes thousands of times, so on the shipped CNN this was more than a third
of certify's CPU time, spent in the kernel (docs/benchmarks.md, session 6). `keep_freed_memory()`
raises both thresholds (`mallopt`), so freed blocks stay in the process and are reused; the peak
resident memory barely moves on that run; the thresholds stop short of the largest tensors so
that their memory is still returned. Anything other than glibc, or a user who
set the allocator through the environment, is left alone. `release_freed_memory()` hands the free
pages of every heap back (`malloc_trim`), between stages whose freed tensors the next one will not reuse;
`trim_heaps()` does the same without the cycle collection, between large passes of one stage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
# Blocks up to 64 MiB come from the heap and are reused; larger ones are still mapped and handed
# back, and up to 256 MiB of free heap top is kept. With 1 GiB for both, the freed halves of
# gigabyte tensors stayed resident: malviz-resnet18's certify peaked at 11.6 GB under
# --memory-limit 4G (docs/benchmarks.md, session 6).
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 64 << 20, 256 << 20
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def _libc():
    """glibc as a ctypes library, or None (another C library, or none loadable)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Free what only reference cycles keep alive (a torch.fx module's copies and autograd graphs
    hold cycles, so their tensors would outlive the stage until the collector's next full pass),
    then give the free pages of every malloc heap back to the kernel (`malloc_trim(0)`); True when
    some pages were."""
    gc.collect()
    return trim_heaps()


def trim_heaps() -> bool:
    """Give the free pages of every malloc heap back to the kernel (`malloc_trim(0)`); True when some
    were. Between large passes whose blocks (below the mmap threshold) would otherwise fragment the
    heaps and keep the resident memory growing from pass to pass."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(trim(0))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were set."""
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
