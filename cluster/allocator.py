"""glibc malloc settings for training processes: keep freed memory instead of returning it every step.

A training step frees and allocates the same large tensors every time (logits, activations, gradients).
By default glibc serves each allocation above its mmap threshold with a fresh mmap and unmaps it on free,
so every step page-faults all of them back in, zero-filled by the kernel: at 2048 tokens x 2048 vocabulary
that was 23 ms of system time in a 74 ms step of a d_model 16 Transformer, and 8,200 page faults. Ray Train
runs the loop in a thread, and a thread's arena unmaps its freed heaps whatever the trim threshold, so the
loop must share the main arena. glibc reads these at process start: they go into the environment of the
Train worker processes (cluster.train_job). Measured in LOG.md (2026-11-22): dense d24, the loop in a
thread, 61.5 -> 40.7 ms per step. The cost: a worker keeps its peak heap, which it reaches in the first
step anyway.
"""

TRAINING_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap
    "MALLOC_MMAP_MAX_": "0",  # large blocks come from the heap, not from an mmap of their own
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),  # and the heap is never given back
}
