"""DeepSpeed ZeRO configs (cluster/configs/zero{0,1,2,3}.json) and the engine built from them.

A template holds what does not depend on the trial (bucket sizes, stage-3 prefetching); `deepspeed_config`
fills in the batch geometry, gradient clipping and precision. `build_engine` runs inside a Ray Train worker,
after Ray has created the torch process group (gloo on CPU, nccl on GPU): DeepSpeed reuses that group.

Conventions (DeepSpeed's, not ours):
- `train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size`, checked
  by DeepSpeed against the process group size.
- The engine averages gradients over data-parallel ranks and scales the loss by 1 / accumulation steps, so a
  loop that returns the mean loss of its micro batch trains exactly like one rank holding the global batch.
"""

import contextlib
import copy
import hashlib
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Literal

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
ZERO_STAGES = (0, 1, 2, 3)
Precision = Literal["fp32", "bf16"]


def set_accelerator_env() -> None:
    """DeepSpeed picks its accelerator at import time; say it instead of letting it guess (and warn)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def deepspeed_extensions_dir() -> Path:
    """Where DeepSpeed JIT-builds its native ops (on a CPU: the shm communication op every engine loads) for
    this Python environment: a directory of its own under torch's extensions root.

    torch names an extension's build directory by the extension's name only, and DeepSpeed's op names are
    fixed, while their build flags hold the environment's include paths. So two checkouts on one machine (a
    developer's tree and a fresh clone, CI's clone, worktrees) shared one directory and each rebuilt the op
    over the other's build: about 40 s in the first engine of every Train worker, and a rebuild in every
    worker of the next run of the other checkout. The PEER kernels need no such care: their build name
    already hashes their flags (model/peer_kernels.py)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"deepspeed-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def deepspeed_op_builds():
    """Within: torch builds and loads extensions in `deepspeed_extensions_dir()`; the caller's setting after."""
    before = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(deepspeed_extensions_dir())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR", None)
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = before


def worker_device() -> torch.device:
    """The device of this worker's model and engine: its local-rank GPU where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _stand_in_for_deepspeed_muon() -> None:
    """DeepSpeed 0.19's ZeRO engine imports its Muon modules whether or not Muon is used: to ask whether the
    optimizer is a `MuonWithAuxAdam`, and once per step before a loop that calls `muon_update` only for
    Muon parameters. The real modules run `torch.compile` at import, which costs each worker about 1.5 s
    of importing torch._inductor. Nothing here builds a Muon optimizer, so stand-ins give DeepSpeed the
    same answers: a class nothing is an instance of, and an update that is never called (and says so if
    it were). Real modules imported earlier are kept."""
    def muon_update(*args, **kwargs):
        raise RuntimeError("Muon is not available under peer-sweeps (see cluster/deepspeed_config.py)")

    package = "deepspeed.runtime.zero.muon"
    attributes = {"muon_optimizer": {"MuonWithAuxAdam": type("MuonWithAuxAdam", (), {})},
                  "original_muon": {"muon_update": muon_update}}
    for module, names in attributes.items():
        name = f"{package}.{module}"
        if name not in sys.modules:
            stand_in = types.ModuleType(name, "peer-sweeps' stand-in: Muon is not used")
            stand_in.__dict__.update(names)
            sys.modules[name] = stand_in


def load_template(zero_stage: int) -> dict[str, Any]:
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    return json.loads((CONFIG_DIR / f"zero{zero_stage}.json").read_text())


def deepspeed_config(
    zero_stage: int,
    micro_batch_per_rank: int,
    grad_accum_steps: int,
    grad_clip: float | None,
    precision: Precision,
    world_size: int,
    on_gpu: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for one trial. `grad_clip` None or 0 disables clipping.

    On GPU, ZeRO 2/3 overlap the gradient reduction with the backward pass; on CPU (gloo) they do not.
    """
    for name, value in (("micro_batch_per_rank", micro_batch_per_rank),
                        ("grad_accum_steps", grad_accum_steps), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    cfg = load_template(zero_stage)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_per_rank
    cfg["gradient_accumulation_steps"] = grad_accum_steps
    cfg["train_batch_size"] = micro_batch_per_rank * grad_accum_steps * world_size
    cfg["gradient_clipping"] = float(grad_clip or 0.0)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    if zero_stage >= 2:
        cfg["zero_optimization"]["overlap_comm"] = on_gpu
    return cfg


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer],
    lr_scheduler: Any | Callable[[torch.optim.Optimizer], Any] | None,
    ds_config: dict[str, Any],
    model_parameters: Any = None,
):
    """`deepspeed.initialize` on the process group Ray Train already set up; returns the engine.

    `optimizer`: a torch optimizer (AdamW: FusedAdam is CUDA-only) built over the caller's parameter groups,
    or a callable `params -> optimizer`, which DeepSpeed calls with `model_parameters` (a parameter-group list
    or an iterable of parameters; default `model.parameters()`).
    `lr_scheduler`: a scheduler, or preferably a callable `optimizer -> scheduler` that DeepSpeed calls with
    its wrapped (ZeRO) optimizer. The engine steps it once per optimizer step and checkpoints it.
    The model is moved to this worker's device (its local-rank GPU, or the CPU).
    """
    set_accelerator_env()
    _stand_in_for_deepspeed_muon()
    import deepspeed
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from cluster.eager_adamw import EagerAdamW

    if EagerAdamW not in ZERO_SUPPORTED_OPTIMIZERS:  # torch's AdamW: spare every trial ZeRO's "untested" warning
        ZERO_SUPPORTED_OPTIMIZERS.append(EagerAdamW)
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_engine runs inside a Ray Train worker: no torch process group is set up")
    if torch.cuda.is_available():
        device = worker_device()
        torch.cuda.set_device(device)
        model = model.to(device)  # a no-op for a model built there (model.build_model(cfg, device))
    if model_parameters is None and callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    with deepspeed_op_builds():  # where initialize() loads (first builds) DeepSpeed's communication op
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=model_parameters,
            lr_scheduler=lr_scheduler,
            config=copy.deepcopy(ds_config),
            dist_init_required=False,
        )
    return engine
