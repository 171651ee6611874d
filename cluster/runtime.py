"""Reach Ray: start an embedded local instance, or join an existing cluster.

`ray_session(None)` starts Ray inside this process, sized to the machine (or `num_cpus`), quiet and without a
dashboard, and shuts it down on exit. `ray_session("auto")`, `ray_session("ray://host:10001")` or a
`RAY_ADDRESS` environment variable join a running cluster, which is left running on exit. With more than
one node, `storage_path` must be storage every node reaches (NFS, or s3:// / gs:// through pyarrow).
"""

import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ray

@dataclass(frozen=True)
class RaySession:
    address: str | None  # None: the embedded instance this session started
    owns_cluster: bool  # True: ray_session started Ray and shuts it down on exit
    storage_path: str  # absolute local path or URI (s3://, gs://) for Train runs and checkpoints
    num_nodes: int
    num_cpus: float
    num_gpus: float
    max_cpus: float = 0.0  # what the cluster can grow to: its autoscaler's maximum (at least what is up now)
    max_gpus: float = 0.0


def resolve_storage_path(storage_path: str | os.PathLike) -> str:
    """URIs are kept as they are; local paths are made absolute (Ray Train needs that) and created."""
    text = str(storage_path)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _training_process_env() -> dict[str, str]:
    """Environment of every process of the session: the Tune trials' actors may train in-process (see
    cluster.train_job), so they get the training processes' malloc settings (settings the caller has win)."""
    from cluster.allocator import TRAINING_MALLOC_ENV

    return {k: v for k, v in TRAINING_MALLOC_ENV.items() if k not in os.environ}


@contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    storage_path: str | os.PathLike = "runs",
    num_gpus: int | None = None,
) -> Iterator[RaySession]:
    """Ray for the duration of the block. `address` None and no `RAY_ADDRESS`: an embedded instance."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    storage = resolve_storage_path(storage_path)
    owns = False
    if ray.is_initialized():
        pass  # a caller (a test, a notebook) already holds Ray: use it and leave it
    elif address is None:
        import torch

        # DeepSpeed picks its accelerator at import time; tell every worker instead of letting it probe.
        accelerator = os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            num_gpus=num_gpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
            configure_logging=True,
            runtime_env={"env_vars": {"DS_ACCELERATOR": accelerator, **_training_process_env()}},
        )
        owns = True
    else:
        if num_cpus is not None or num_gpus is not None:
            raise ValueError("num_cpus / num_gpus size an embedded Ray instance; a joined cluster has its own")
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": _training_process_env()})
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        resources = ray.cluster_resources()
        most = autoscaler_max_resources() or {}
        yield RaySession(
            address=address,
            owns_cluster=owns,
            storage_path=storage,
            num_nodes=len(nodes),
            num_cpus=resources.get("CPU", 0.0),
            num_gpus=resources.get("GPU", 0.0),
            max_cpus=max(resources.get("CPU", 0.0), most.get("CPU", 0.0)),
            max_gpus=max(resources.get("GPU", 0.0), most.get("GPU", 0.0)),
        )
    finally:
        if owns:
            ray.shutdown()


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may bring up (its node types' `max_workers` times
    their resources, capped by the cluster's own maximum), as Ray Train reads it; None without an autoscaler.
    An autoscaling cluster that starts with `min_workers: 0` has no GPU up at the start."""
    from ray._private.state import state

    try:
        return state.get_max_resources_from_cluster_config()
    except Exception:  # an older or newer Ray without it: only what is up counts
        return None


def current_node_id() -> str:
    """The Ray node id (hex) of the calling process: a driver, a Tune trial or a Train worker."""
    return ray.get_runtime_context().get_node_id()


class SharedStorageError(ValueError):
    """A path the study needs is not the same on every node of a joined cluster."""


MARKER_NAME = ".peer-sweeps-node-check"


def paths_seen_here(marker: str, token: str, must_exist: list[str]) -> list[str]:
    """On one node: the problems with what the driver wrote and needs (empty when all is well)."""
    problems = []
    try:
        with open(marker) as f:
            if f.read() != token:
                problems.append(f"{os.path.dirname(marker)} holds another run's check file (not the same storage)")
    except OSError:
        problems.append(f"{os.path.dirname(marker)} is not there or not the driver's (not shared storage)")
    problems += [f"{path} does not exist" for path in must_exist if not os.path.exists(path)]
    return problems


def check_shared_storage(session: RaySession, shared_dir: str | os.PathLike, must_exist: list[str]) -> None:
    """Fail early, naming the node, when a joined multi-node cluster cannot see the driver's files.

    The driver writes a check file into `shared_dir` (the results directory: trials write their metrics there
    and the driver reads them back); one zero-CPU task pinned to each alive node reads it and looks for each
    of `must_exist` (the data root). Nothing to check on an embedded or one-node instance, or for URIs.
    """
    if session.owns_cluster or session.num_nodes < 2 or "://" in str(shared_dir):
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = os.path.join(os.path.abspath(shared_dir), MARKER_NAME)
    token = secrets.token_hex(8)
    with open(marker, "w") as f:
        f.write(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(paths_seen_here)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        pending = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote(marker, token, list(must_exist)) for n in nodes]
        report = {f"{n['NodeID'][:12]} ({n['NodeManagerAddress']})": p for n, p in zip(nodes, ray.get(pending))}
    finally:
        os.remove(marker)
    bad = {node: problems for node, problems in report.items() if problems}
    if bad:
        lines = "; ".join(f"node {node}: {', '.join(problems)}" for node, problems in bad.items())
        raise SharedStorageError(f"every node of the cluster must see the same files: {lines}. Put the results "
                                 f"directory and the data root on storage that every node mounts (NFS, EFS, a "
                                 f"ReadWriteMany volume), or prepare the data on every node")
