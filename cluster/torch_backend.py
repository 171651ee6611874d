"""A torch process-group backend for Ray Train whose controller side never imports torch.

Ray Train's `TorchConfig` lives in a module that imports torch at the top, and the Train controller
unpickles it: every job's controller process then spends about 2.5 s of CPU importing torch on the path
to its first worker, for a backend whose only torch calls happen on the workers. `LazyTorchConfig` is the
same process-group setup (env:// rendezvous at rank 0's address, `init_process_group` on every worker,
`destroy_process_group` at the end), with torch imported only inside the functions the workers run.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


@dataclass
class LazyTorchConfig(BackendConfig):
    backend: str = "gloo"  # "nccl" on GPUs
    timeout_s: int = 1800  # bound of every collective

    @property
    def backend_cls(self):
        return _LazyTorchBackend

    @property
    def train_func_context(self):
        return _CudaDeviceContext

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


class _LazyTorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: LazyTorchConfig):
        from ray.train._internal.utils import get_address_and_port

        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_rendezvous_env, addr=master_addr, port=master_port)
        ray.get([
            worker_group.execute_single_async(
                rank, _init_process_group, backend=backend_config.backend, world_rank=rank,
                world_size=len(worker_group), timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))
        ])

    def on_shutdown(self, worker_group, backend_config: LazyTorchConfig):
        try:
            ray.get(worker_group.execute_async(_destroy_process_group), timeout=30)
        except ray.exceptions.GetTimeoutError:
            pass  # the workers are torn down next anyway


def _set_rendezvous_env(addr: str, port: int) -> None:
    context = ray.train.get_context()
    os.environ.update({
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
        "RANK": str(context.get_world_rank()),
        "WORLD_SIZE": str(context.get_world_size()),
        "LOCAL_RANK": str(context.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "NODE_RANK": str(context.get_node_rank()),
    })


def _init_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    import torch.distributed as dist

    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # fail, not hang, on a timed-out op
    dist.init_process_group(backend=backend, init_method="env://", rank=world_rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _CudaDeviceContext:
    """Around the training function on each worker: the GPU of its local rank becomes the current CUDA
    device, the one DeepSpeed's engine picks too (a node's workers all see the node's trial GPUs)."""

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    def __exit__(self, *exc):
        return False
