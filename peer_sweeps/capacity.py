"""What a trial needs before it runs: device memory per worker, checkpoint storage, and GPU time.

Analytical, from the model config and the DeepSpeed set-up a trial gets (cluster/configs/zero*.json); no
model is built. tests/test_capacity.py cross-checks the memory model against one forward + backward + AdamW
step of the real model at its real shapes under `torch._subclasses.FakeTensorMode` (no memory allocated).

Memory of one worker (bytes; P parameters, w = 2 in bf16 or 4 in fp32, W data-parallel ranks, b sequences
of S tokens per micro-batch, B = b S tokens, V vocabulary, L layers, d model width):
  weights        P w, or P w / W under ZeRO-3
  optimizer      AdamW moments 8 P, and the fp32 master copy 4 P (in bf16, and under ZeRO 1-3, which keeps its
                 own fp32 partition), divided by W under ZeRO 1-3
  gradients      ZeRO 0-1: every parameter's gradient (P w; in bf16 also DeepSpeed's fp32 copy, 4 P / W at
                 stage 1); ZeRO 2-3: the reduced fp32 partition 4 P / W and the reduce buckets
                 (reduce_bucket_size elements, two of them where communication overlaps: on GPU)
  activations    what backward keeps per micro-batch: 16 B d w per block (measured under FakeTensorMode:
                 residual, norms, qkv, attention output and log-sum-exp, FFW hidden before and after GELU),
                 the logits B V w, and the sparse layer's queries, gates and indices
  loss           the fp32 log-softmax of the logits and its gradients: 12 B V
  sparse layer   PEER's dense N x d table gradients (one per table, both produced by one backward call) and
                 the torch backend's row gradients (GPUs run it): B h k x d contributions, materialised one
                 table at a time, and U x d unique rows per table, U = min(B h k, N) (the worst case, every
                 retrieved row distinct); PKM's dense N x d value gradient; the sub-keys' gradients
  optimizer step AdamW's temporaries (torch's single-tensor AdamW): the square root and the denominator of
                 the tensor being updated, and the previous tensor's denominator, still referenced: 2 fp32
                 copies of the largest tensor it updates and 1 of the second largest (parameters; under
                 ZeRO 1-3 a flat partition)
The peak is the largest of three moments of a step: the loss (all activations live), the sparse layer's
backward (the blocks below it and the logits, which the training loop holds, still live; its gradient
buffers), and the optimizer step.

Not counted: the CUDA context and allocator fragmentation (a few GB: keep `resources.gpu_memory_gb` below
the card's size), NCCL buffers, DeepSpeed's ZeRO-3 prefetch of gathered parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from model import ModelConfig, MoEConfig, PEERConfig, PKMConfig
from model.flops import forward_flops_breakdown, params_total

GB = 1e9
REDUCE_BUCKET_ELEMENTS = 500_000_000  # cluster/configs/zero{2,3}.json reduce_bucket_size
ACTIVATION_ELEMENTS_PER_BLOCK_TOKEN_DIM = 16  # per block, token and model dimension (see the docstring)
LOSS_BYTES_PER_LOGIT = 12  # fp32 log-softmax output, its gradient and the logits' gradient


def precision_of(training: dict, gpus_per_worker: float) -> str:
    """The precision a trial's workers train in: `training.precision`, "auto" being bf16 on GPU workers."""
    precision = training["precision"]
    if precision == "auto":
        return "bf16" if gpus_per_worker > 0 else "fp32"
    return precision


@dataclass(frozen=True)
class WorkerMemory:
    """Peak device memory of one worker, in bytes, by the moment of the step it occurs at."""

    weights: float
    optimizer: float
    gradients: float
    activations: float
    at_loss: float
    at_sparse_backward: float
    at_optimizer_step: float

    @property
    def peak(self) -> float:
        return max(self.at_loss, self.at_sparse_backward, self.at_optimizer_step)

    @property
    def peak_gb(self) -> float:
        return self.peak / GB


def expert_table_params(cfg: ModelConfig) -> int:
    """Parameters in PEER's or PKM's N x d tables (read by gathers, with dense N x d gradients)."""
    s = cfg.sparse
    tables = 2 if isinstance(s, PEERConfig) else 1 if isinstance(s, PKMConfig) else 0
    return tables * s.num_experts * cfg.d_model * len(cfg.sparse_layer_ids) if tables else 0


def worker_memory(cfg: ModelConfig, seq_len: int, micro_batch: int, world: int, zero_stage: int, precision: str,
                  on_gpu: bool = True, row_sparse_tables: bool = False) -> WorkerMemory:
    """Peak memory of one of `world` data-parallel workers training `cfg` on `micro_batch` sequences of
    `seq_len` tokens per micro-step (see the module docstring). `row_sparse_tables`: PEER's tables are
    optimised outside the engine (training.expert_tables: row_sparse): fp32 moments of the whole tables on
    every rank, sparse gradients only."""
    w = 2 if precision == "bf16" else 4
    P = params_total(cfg)
    tables = expert_table_params(cfg)
    engine_params = P - tables if row_sparse_tables else P
    shard = world if zero_stage >= 1 else 1
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    tokens = micro_batch * seq_len

    weights = P * w / (world if zero_stage == 3 else 1)
    state_bytes = 8 + (4 if _master_copy(precision, zero_stage) else 0)
    optimizer = state_bytes * engine_params / shard + (8 * tables if row_sparse_tables else 0)
    if zero_stage <= 1:
        fp32_copy = 4 * engine_params / shard if precision == "bf16" else 0
        gradients = P * w + fp32_copy
    else:
        buckets = 2 if on_gpu else 1
        gradients = 4 * engine_params / world + buckets * min(REDUCE_BUCKET_ELEMENTS, engine_params) * w

    per_block = ACTIVATION_ELEMENTS_PER_BLOCK_TOKEN_DIM * tokens * d * w
    sparse_layers = len(cfg.sparse_layer_ids)
    sparse_saved, sparse_backward = _sparse_layer(cfg, tokens, w, zero_stage, row_sparse_tables)
    activations = L * per_block + sparse_layers * sparse_saved + tokens * V * w
    static = weights + optimizer
    at_loss = static + activations + LOSS_BYTES_PER_LOGIT * tokens * V
    below = min(cfg.sparse_layer_ids, default=0) * per_block
    # ZeRO 0-1: the tables' gradients are not there yet (the sparse layer's backward makes them)
    earlier_gradients = gradients - (tables * w if zero_stage <= 1 and not row_sparse_tables else 0)
    at_sparse_backward = static + earlier_gradients + below + sparse_saved + tokens * V * w + sparse_backward
    largest, second = (engine_params / shard, 0) if zero_stage >= 1 else _two_largest_parameters(cfg)
    at_optimizer_step = static + gradients + tokens * V * w + 4 * (2 * largest + second)
    return WorkerMemory(weights, optimizer, gradients, activations, at_loss, at_sparse_backward, at_optimizer_step)


def _sparse_layer(cfg: ModelConfig, tokens: int, w: int, zero_stage: int, row_sparse: bool) -> tuple[float, float]:
    """(bytes a sparse layer keeps for backward beyond a dense block's, bytes its backward adds at once)."""
    s, d = cfg.sparse, cfg.d_model
    if isinstance(s, MoEConfig):
        # expert choice: the gathered tokens and expert outputs (capacity factor x tokens), router probabilities
        return s.experts_per_token * tokens * 2 * d * w + tokens * s.num_experts * 4, 0.0
    if not isinstance(s, (PEERConfig, PKMConfig)):
        return 0.0, 0.0
    M = s.heads * s.top_k
    saved = tokens * (3 * s.heads * s.query_dim * w + 3 * M * w + 2 * M * 8)
    table = s.num_experts * d * w
    # the sub-keys' gradient: the retrieved scores' gradients times the half-queries, [tokens, k, d_q / 2]
    # per head at once (PKM: a head at a time), for both halves
    retrieval = 2 * tokens * (M if isinstance(s, PEERConfig) else s.top_k) * (s.query_dim // 2) * w
    if isinstance(s, PKMConfig):
        return saved, max(retrieval, table)
    if not row_sparse:
        # the torch kernels (GPUs' path) sum each table's gradient into a dense N x d buffer in fp32 by
        # embedding_bag's per-sample-weight backward (no [tokens, h k, d] tensor), then cast it to the table's dtype
        tables_fp32 = 2 * s.num_experts * d * 4
        return saved, max(tables_fp32 + (2 * table if w != 4 else 0), retrieval)
    unique = min(tokens * M, s.num_experts) * d * 4
    contributions = tokens * M * d * 4
    row_grads = max(2 * contributions + unique, contributions + 2 * unique)
    return saved, max(row_grads, 2 * unique, retrieval)


def _two_largest_parameters(cfg: ModelConfig) -> tuple[int, int]:
    s, d = cfg.sparse, cfg.d_model
    sizes = [cfg.vocab_size * d, 3 * d * d, d * cfg.ffw_dim, d * cfg.ffw_dim]
    if not cfg.tie_embeddings:
        sizes.append(cfg.vocab_size * d)
    if isinstance(s, PEERConfig):
        sizes += [s.num_experts * d] * 2
    elif isinstance(s, PKMConfig):
        sizes.append(s.num_experts * d)
    elif isinstance(s, MoEConfig):
        sizes += [s.num_experts * d * cfg.ffw_dim] * 2
    largest, second = sorted(sizes)[-2:][::-1]
    return largest, second


def _master_copy(precision: str, zero_stage: int) -> bool:
    """Whether DeepSpeed keeps an fp32 copy of the weights beside the module's (bf16, or any ZeRO partition)."""
    return precision == "bf16" or zero_stage >= 1


def checkpoint_bytes(cfg: ModelConfig, precision: str, zero_stage: int, row_sparse_tables: bool = False) -> float:
    """One DeepSpeed checkpoint of a trial, all ranks together: the module's weights (P w) and the optimizer
    states (AdamW moments 8 P and the fp32 master copy 4 P where there is one), so about 14 bytes per
    parameter in bf16. Row-sparse tables: their moments in shared.pt (8 bytes each)."""
    w = 2 if precision == "bf16" else 4
    P = params_total(cfg)
    tables = expert_table_params(cfg) if row_sparse_tables else 0
    states = (12 if _master_copy(precision, zero_stage) else 8) * (P - tables) + 8 * tables
    return P * w + states


def fit_micro_batch(memory_at, per_worker: int, requested: int, limit_bytes: float) -> int | None:
    """The largest micro-batch, at most `requested` and dividing `per_worker` sequences (gradient accumulation
    keeps the global batch), whose `memory_at(micro_batch)` fits `limit_bytes`; None if not even 1 fits."""
    for micro in range(requested, 0, -1):
        if per_worker % micro == 0 and memory_at(micro) <= limit_bytes:
            return micro
    return None


# ------------------------------------------------------------------------------------------- GPU time
# An H100 SXM (the AWS and KubeRay recipes' GPU). Dense matmuls run at an MFU; PEER's and PKM's gathers and
# scatters, the dense table gradients and the optimizer's passes over its states are memory-bound and run at
# HBM bandwidth (random rows of a few KB reach about half of its peak); the table gradients' reduction and
# the weights' all-gather cross NVLink; checkpoints are written to shared storage at the throughput of the
# AWS recipe's head volume, every rank waiting.
GPU_PEAK_FLOPS = 989e12  # dense bf16
GPU_MFU = 0.4
HBM_BYTES_PER_SECOND = 0.5 * 3.35e12
INTERCONNECT_BYTES_PER_SECOND = 200e9  # per GPU, NCCL reduce-scatter / all-gather within a node
STORAGE_BYTES_PER_SECOND = 500e6  # the AWS recipe's gp3 head volume (its default is 125 MB/s)
TRIAL_STARTUP_SECONDS = 120.0  # Ray Train workers, DeepSpeed engine, data memmaps, W&B


@dataclass(frozen=True)
class GpuTime:
    """Wall seconds of one trial on its `world` GPUs, by part; `gpu_hours` is their sum times `world`."""

    world: int
    matmuls: float
    gathers: float
    table_gradients: float
    optimizer: float
    evaluation: float
    checkpoints: float
    startup: float = TRIAL_STARTUP_SECONDS

    @property
    def seconds(self) -> float:
        return (self.matmuls + self.gathers + self.table_gradients + self.optimizer + self.evaluation
                + self.checkpoints + self.startup)

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.world / 3600


def gather_bytes_per_token(cfg: ModelConfig, w: int, backward: bool = True) -> float:
    """Bytes of expert rows a token moves through HBM in PEER's or PKM's layers.

    PEER, per retrieved expert (h k of them): forward reads a row of each table (u for the down projection,
    v for the up projection); backward reads both again and the torch backend writes and reads back one
    row-sized contribution per table. PKM: one value row forward, one scattered gradient row backward."""
    s = cfg.sparse
    if not isinstance(s, (PEERConfig, PKMConfig)):
        return 0.0
    rows = s.heads * s.top_k * len(cfg.sparse_layer_ids)
    if isinstance(s, PEERConfig):
        return rows * cfg.d_model * w * (2 + (6 if backward else 0))
    return rows * cfg.d_model * w * (1 + (1 if backward else 0))


def gpu_time(cfg: ModelConfig, *, seq_len: int, batch_tokens: int, steps: int, micro_batch: int, world: int,
             zero_stage: int, precision: str, evaluation_tokens: int, checkpoints: int,
             checkpoint_size: float) -> GpuTime:
    """The cost model behind `plan`'s GPU-hours (see the constants above). `evaluation_tokens`: tokens
    evaluated over the trial (evaluations x sets x tokens per set)."""
    w = 2 if precision == "bf16" else 4
    breakdown = forward_flops_breakdown(cfg, seq_len)
    gathered = breakdown.get("experts", 0.0) if isinstance(cfg.sparse, (PEERConfig, PKMConfig)) else 0.0
    dense_forward = sum(breakdown.values()) - gathered
    rate = GPU_MFU * GPU_PEAK_FLOPS
    tokens_per_rank = steps * batch_tokens / world
    matmuls = 3 * dense_forward * tokens_per_rank / rate
    gathers = gather_bytes_per_token(cfg, w) * tokens_per_rank / HBM_BYTES_PER_SECOND

    micro_steps = steps * batch_tokens // (seq_len * micro_batch * world)
    table_bytes = expert_table_params(cfg) * w
    # every micro-step writes the dense table gradients (zeros, then the touched rows) and, across ranks,
    # reduces them (ZeRO 2-3 at every micro-step; a good approximation for 0-1)
    table_gradients = micro_steps * (2 * table_bytes / HBM_BYTES_PER_SECOND
                                     + table_bytes * (world - 1) / world / INTERCONNECT_BYTES_PER_SECOND)
    P = params_total(cfg)
    shard = world if zero_stage >= 1 else 1
    # AdamW reads master, gradient and both moments and writes master, moments and the module's weights;
    # then the updated weights are all-gathered (ZeRO 1-3)
    optimizer = steps * ((28 + w) * P / shard / HBM_BYTES_PER_SECOND
                         + (P * w * (world - 1) / world / INTERCONNECT_BYTES_PER_SECOND if zero_stage >= 1 else 0))
    evaluation = evaluation_tokens / world * (dense_forward / rate
                                              + gather_bytes_per_token(cfg, w, backward=False) / HBM_BYTES_PER_SECOND)
    return GpuTime(world=world, matmuls=matmuls, gathers=gathers, table_gradients=table_gradients,
                   optimizer=optimizer, evaluation=evaluation,
                   checkpoints=checkpoints * checkpoint_size / STORAGE_BYTES_PER_SECOND)


# ------------------------------------------------------------------------------------------- measured
# Dense bf16 peaks by device name (NVIDIA data sheets, without sparsity); an unknown GPU counts as an H100.
DEVICE_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                     "A10G": 70e12, "A10": 125e12}


def device_peak_flops(device_name: str) -> float:
    for name, flops in DEVICE_PEAK_FLOPS.items():
        if name in device_name:
            return flops
    return GPU_PEAK_FLOPS


class GpuMeter:
    """On a GPU worker: each step's MFU (the model FLOPs this rank computed over the step's seconds, against
    the device's dense bf16 peak) and peak allocated memory since the previous step; the trial's peak is
    kept in `state` (checkpointed with it)."""

    def __init__(self, device, flops_per_rank_step: float, state: dict):
        import torch

        self.torch, self.device, self.flops, self.state = torch, device, flops_per_rank_step, state
        self.peak_flops = device_peak_flops(torch.cuda.get_device_name(device))
        state.setdefault("gpu_memory_gb", 0.0)

    def step(self, seconds: float) -> dict[str, float]:
        cuda = self.torch.cuda
        memory = cuda.max_memory_allocated(self.device) / GB
        cuda.reset_peak_memory_stats(self.device)
        self.state["gpu_memory_gb"] = max(self.state["gpu_memory_gb"], memory)
        return {"mfu": self.flops / seconds / self.peak_flops, "gpu_memory_gb": memory}

    def summary(self, steps: int, train_seconds: float) -> dict[str, float | None]:
        mfu = steps * self.flops / train_seconds / self.peak_flops if train_seconds else None
        return {"mfu": mfu, "gpu_memory_gb": self.state["gpu_memory_gb"]}
