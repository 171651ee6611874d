"""Keep freed memory in the process instead of returning it to the kernel after every training step.

A training step frees and allocates the same large tensors every time (logits, activations, gradients).
By default glibc serves each allocation above its mmap threshold with a fresh mmap and unmaps it on free,
so every step page-faults all of them back in, zero-filled by the kernel: at 2048 tokens x 2048 vocabulary
that was 23 ms of system time in a 74 ms step of a d_model 16 Transformer, and 8,200 page faults
(benchmarks in LOG.md, 2026-11-22). Served from the heap and never trimmed, the step took 45 ms. The cost:
the process keeps its peak heap, which a training loop reaches in its first step anyway.
"""

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never trim it. False where libc is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
