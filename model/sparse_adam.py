"""Row-sparse AdamW for PEER's expert tables, and what a data-parallel trainer needs around it.

A step of PEER touches at most T*h*k rows of each (N, d) expert table; a dense AdamW step reads and writes
all N rows of the parameter and both moments (about 7 x N x d x 4 bytes per table), a cost that grows with N
and dominates the step at N = 1024^2. `RowSparseAdam` applies torch.optim.AdamW's arithmetic to the rows
present in a sparse gradient only ("lazy" Adam, as torch.optim.SparseAdam and TF LazyAdam):
- a touched row gets exactly AdamW's update (decoupled weight decay, moments, bias correction from the
  optimizer's step count, which counts every `step()` call, touched or not);
- an untouched row, and its moments, are left as they are: no momentum-only update and no weight decay
  while untouched. This is where it differs from dense AdamW (rows touched every step are identical).
Dense gradients are accepted too, and then every row is touched (exactly AdamW).

DeepSpeed ZeRO has no sparse-gradient path, so a trial with `training.expert_tables: row_sparse` keeps the
expert tables out of the DeepSpeed engine's optimizer (BENCHMARKS.md: the decision and the measurements):
`expert_tables(model)` lists them, `all_reduce_row_sparse_grads` averages their sparse gradients over
data-parallel ranks, `clip_row_sparse_grads_` clips them by their own norm, and `ExpertTableOptimizer` puts
the three together for a training loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import peer_kernels as K


class RowSparseAdam(torch.optim.Optimizer):
    """AdamW on the rows of each parameter that its (sparse COO) gradient touches; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid RowSparseAdam hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"RowSparseAdam takes 2-d tables, got a parameter of shape {tuple(p.shape)}")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = _zero_table_like(p)
                    state["exp_avg_sq"] = _zero_table_like(p)
                state["step"] += 1
                rows, grad = touched_rows(p.grad)
                K.row_adam_(
                    p.data, state["exp_avg"], state["exp_avg_sq"], rows, grad,
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    bias_correction1=1 - beta1 ** state["step"], bias_correction2=1 - beta2 ** state["step"],
                )
        return loss


def _zero_table_like(p: torch.Tensor) -> torch.Tensor:
    if p.device.type == "cpu":  # huge pages: the moments are read and written at random rows, like the table
        return K.empty_table(*p.shape, dtype=p.dtype).zero_()
    return torch.zeros_like(p, memory_format=torch.contiguous_format)


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [U], values [U, d]) of a gradient: a sparse COO one's coalesced rows, or every row of a dense one."""
    if grad.is_sparse:
        if grad.is_coalesced():
            return grad.indices()[0], grad.values()
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):  # already unique and sorted (as PEER's are)
            return rows, grad._values()
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    return torch.arange(grad.shape[0], device=grad.device), grad


def expert_tables(model: nn.Module) -> list[nn.Parameter]:
    """The w_down / w_up tables of every PEER layer of `model` (the parameters for RowSparseAdam)."""
    from .peer import PEERReference

    return [p for m in model.modules() if isinstance(m, PEERReference) for p in (m.w_down.weight, m.w_up.weight)]


def all_reduce_row_sparse_grads(params, group=None) -> None:
    """Average the sparse COO gradients of `params` over the ranks of `group`, in place (p.grad replaced).

    Each rank touches different rows, so rows and values are all-gathered (padded to the largest count) and
    coalesced: communication is world_size x (touched rows x d), independent of N. Every rank must call it
    with the same parameters in the same order.
    """
    world = dist.get_world_size(group)
    for p in params:
        if p.grad is None:
            raise ValueError("all_reduce_row_sparse_grads: a parameter has no gradient on this rank")
        rows, values = touched_rows(p.grad)
        count = torch.tensor([rows.numel()], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        most = int(max(c.item() for c in counts))
        pad = most - rows.numel()
        rows_padded = torch.cat([rows, rows.new_zeros(pad)])
        values_padded = torch.cat([values, values.new_zeros(pad, values.shape[1])])
        all_rows = [torch.empty_like(rows_padded) for _ in range(world)]
        all_values = [torch.empty_like(values_padded) for _ in range(world)]
        dist.all_gather(all_rows, rows_padded, group=group)
        dist.all_gather(all_values, values_padded, group=group)
        rows = torch.cat([r[: int(c.item())] for r, c in zip(all_rows, counts)])
        values = torch.cat([v[: int(c.item())] for v, c in zip(all_values, counts)]) / world
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape).coalesce()


def clip_row_sparse_grads_(params, max_norm: float) -> torch.Tensor:
    """Scale the (sparse or dense) gradients of `params` so that their joint 2-norm is at most max_norm;
    returns the norm before clipping (as torch.nn.utils.clip_grad_norm_ does for dense gradients)."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    parts = [p.grad.values() if p.grad.is_sparse else p.grad for p in params]  # views of the gradients
    norm = torch.stack([g.norm() for g in parts]).norm() if parts else torch.tensor(0.0)
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in parts:
            g.mul_(scale)
    return norm


class ExpertTableOptimizer:
    """The expert tables of every PEER layer of `model`, trained beside a DeepSpeed engine that holds the rest.

    Construction switches the PEER layers to sparse table gradients. After the backward passes of an
    optimizer step, every data-parallel rank calls `step(lr)`: it averages the table gradients over the ranks,
    clips them by their own norm (`grad_clip`; None or 0: no clipping), applies RowSparseAdam at `lr` and
    releases the gradients (so the layers can reuse their buffers). The engine must be given the other
    parameters only (`is_table` tells them apart). Every rank holds the same tables and moments, so one
    rank's `state_dict()` restores them all.
    """

    def __init__(self, model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                 grad_clip: float | None, eps: float = 1e-8):
        from .peer import PEER

        self.tables = expert_tables(model)
        if not self.tables:
            raise ValueError("ExpertTableOptimizer: the model has no PEER layer")
        for module in model.modules():
            if isinstance(module, PEER):
                module.sparse_grad = True
        self.grad_clip = grad_clip
        self.optimizer = RowSparseAdam(self.tables, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def is_table(self, param: torch.Tensor) -> bool:
        return any(param is table for table in self.tables)

    def step(self, lr: float) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            all_reduce_row_sparse_grads(self.tables)
        if self.grad_clip:
            clip_row_sparse_grads_(self.tables, self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for table in self.tables:
            table.grad = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
