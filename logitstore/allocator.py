"""How a dump's or a training run's C heap treats the memory each batch frees (glibc only).

A batch allocates and frees the same tensors again and again (the images, activations, gradients). By
default glibc serves a block over 128 KiB with its own mmap and unmaps it when freed, and returns a
free heap top over its trim threshold to the system; both thresholds then grow with the largest
block freed so far. So whether a batch's tensors stay mapped depends on what the process happened to
free before: a process that loaded a large array first (the in-RAM ceiling of
benchmarks/fit_throughput.py) keeps them, while `trainer fit`, whose images live in shared memory,
was seen to unmap and fault them back in every step in some runs and not in others (300,000-400,000
page faults an epoch, the student step ~20% slower; benchmarks/RESULTS.md, issue 16), and a CPU dump
of 20,000 small images took 3.4 million page faults and 6.4 s of system time (RESULTS.md, "Round 8").
Fixed thresholds make every run keep them.
"""
from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

# Blocks up to this size come from the heap: glibc's own ceiling for the threshold it adapts
# (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), i.e. what a process that freed a large array reaches anyway.
MMAP_THRESHOLD = 32 << 20
# A free heap top is returned to the system only beyond this: twice the mmap threshold, glibc's own rule.
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def keep_freed_memory() -> bool:
    """Fix the C heap's thresholds for this process (a dump's or a training loop's steady state): blocks up to
    MMAP_THRESHOLD are reused from the heap rather than mapped and unmapped each step. Process-wide and
    lasting, like any allocator setting; it changes no value computed. True where it applied (glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
