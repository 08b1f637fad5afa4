"""Optionally keep freed memory in the process, so that large tensors reuse it instead of page-faulting fresh pages.

glibc's malloc hands every allocation above its mmap threshold (at most 32 MB) to a fresh ``mmap`` and returns it to
the kernel on free. A CPU training step allocates and frees thousands of tensors of 10-100 MB, so each one is
page-faulted (and zeroed by the kernel) anew: an elementwise op into a fresh 50 MB output took 15 ms where the same
op in place took 2.5 ms (2 threads, AMD EPYC). ``keep_freed_memory()`` turns mmap allocations off and raises the trim
threshold (``mallopt``), so freed blocks stay in the heap for the next step.

Measured on the training benchmark (benchmarks/RESULTS.md): a padded ML-Mamba step 78.0 -> 61.2 s (LLaVA's 66.8 ->
64.4 s), but a 1.2-1.3x higher peak RSS (11.9 -> 14.7 GB), which kept rising over the first ~6 steps as the heap
fragments (posix_memalign'd blocks leave holes). So it is opt-in: ``ML_MAMBA_KEEP_FREED_MEMORY=1`` before
``ml-mamba-train`` or the demos, on machines with memory to spare. Also measured and not kept: PyTorch's
transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``: 24x fewer page faults, but steps 1.15-1.3x slower) and a 32 MB
mmap threshold (no faster than the default).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h
_TRIM_THRESHOLD = 2**31 - 1  # the largest the int parameter takes: freed memory stays unless 2 GB are free on top
_ENV = "ML_MAMBA_KEEP_FREED_MEMORY"


def keep_freed_memory(force: bool = False) -> bool:
    """Set glibc malloc to keep freed memory for reuse when ``ML_MAMBA_KEEP_FREED_MEMORY=1`` (or ``force``); True
    when it did. False (and nothing changed) otherwise, or off Linux/glibc (macOS, musl)."""
    if not force and os.environ.get(_ENV, "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not done:
        logger.warning("mallopt refused the settings; malloc is left as it was.")
    return done


__all__ = ["keep_freed_memory"]
