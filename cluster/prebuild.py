"""Build the native code trials compile on first use, so that the first trials of a run do not.

    python -m cluster.prebuild        (`make install` runs it)

Two JIT builds live in ~/.cache/torch_extensions: the PEER C++ kernels (model.peer_kernels, about 1.5-2
min; one build per source and flags) and DeepSpeed's shared-memory communication op, which every DeepSpeed
engine on a CPU builds when it starts (about 50 s; one build per Python environment,
cluster.deepspeed_config.deepspeed_extensions_dir). A failed build is reported, not fatal: PEER falls back
to its torch kernels, and DeepSpeed builds its op again when an engine needs it.
"""

import os
import sys
import time


def main() -> int:
    from cluster.deepspeed_config import deepspeed_op_builds, set_accelerator_env

    set_accelerator_env()
    failed = False
    t0 = time.perf_counter()
    from model import peer_kernels

    if peer_kernels._cpp() is None:
        print(f"prebuild: PEER C++ kernels not built ({peer_kernels._cpp_error})", file=sys.stderr)
        failed = True
    else:
        print(f"prebuild: PEER C++ kernels ready ({time.perf_counter() - t0:.0f} s)")
    if os.environ["DS_ACCELERATOR"] == "cpu":
        t0 = time.perf_counter()
        try:
            from deepspeed.comm.torch import build_shm_op

            with deepspeed_op_builds():
                build_shm_op()
            print(f"prebuild: DeepSpeed shm op ready ({time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # DeepSpeed retries when an engine starts
            print(f"prebuild: DeepSpeed shm op not built ({type(e).__name__}: {e})", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
