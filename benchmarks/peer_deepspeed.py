"""How PEER's expert tables are optimised under DeepSpeed: the two options of issue 7, measured.

    .venv/bin/python benchmarks/peer_deepspeed.py equiv                  # 1 rank == 2 ranks (query BN off: QBN=0)
    .venv/bin/python benchmarks/peer_deepspeed.py sparse SQRT_N D STEPS WORLD
    .venv/bin/python benchmarks/peer_deepspeed.py dense  SQRT_N D STEPS WORLD

A one-layer PEER Transformer (h 8, k 16, query_dim 32), global batch 16 x 64 tokens, ZeRO-2, fp32, gloo on CPU.
- sparse: the recipe of BENCHMARKS.md: tables with sparse gradients outside the engine, averaged over ranks
  with all_reduce_row_sparse_grads, clipped by their own norm, updated by RowSparseAdam before engine.step();
- dense: the tables are ordinary parameters inside ZeRO (dense (N, d) gradients, reduce-scatter, AdamW).
Prints one JSON line per run: the losses and the median step time (first step excluded).
"""
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn.functional as F

def run(rank, world, port, mode, n_sub, d, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from model import ModelConfig, build_model, PEER
    from model.sparse_adam import RowSparseAdam, expert_tables, all_reduce_row_sparse_grads, clip_row_sparse_grads_
    from cluster.deepspeed_config import deepspeed_config, build_engine
    cfg = ModelConfig(vocab_size=128, d_model=d, n_layers=1, n_heads=2, max_seq_len=64,
                      sparse={"method": "peer", "num_experts": n_sub**2, "heads": 8, "top_k": 16, "query_dim": 32, "query_bn": os.environ.get("QBN", "1") == "1"})
    torch.manual_seed(0)
    model = build_model(cfg)
    tables = expert_tables(model)
    gb = 16; micro = gb // world
    dsc = deepspeed_config(zero_stage=2, micro_batch_per_rank=micro, grad_accum_steps=1, grad_clip=1.0, precision="fp32", world_size=world)
    if mode == "sparse":
        for m in model.modules():
            if isinstance(m, PEER): m.sparse_grad = True
        rest = [p for p in model.parameters() if all(p is not t for t in tables)]
        engine = build_engine(model, torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.0), None, dsc, model_parameters=rest)
        table_opt = RowSparseAdam(tables, lr=1e-2)
    else:
        engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), None, dsc)
    losses, times = [], []
    g = torch.Generator().manual_seed(5)
    for s in range(steps):
        seq = torch.randint(0, 128, (gb, 65), generator=g)[rank * micro:(rank + 1) * micro]
        t0 = time.perf_counter()
        loss = F.cross_entropy(engine(seq[:, :-1]).reshape(-1, 128), seq[:, 1:].reshape(-1))
        engine.backward(loss)
        if mode == "sparse":
            all_reduce_row_sparse_grads(tables)
            clip_row_sparse_grads_(tables, 1.0)
            table_opt.step()
            for t in tables: t.grad = None
        engine.step()
        times.append(time.perf_counter() - t0)
        l = loss.detach().clone(); dist.all_reduce(l); losses.append(l.item() / world)
    if rank == 0:
        out.put({"mode": mode, "world": world, "N": n_sub**2, "losses": losses, "step_s": statistics.median(times[1:])})
    dist.destroy_process_group()

def launch(world, mode, n_sub, d, steps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(run, args=(world, port, mode, n_sub, d, steps, q), nprocs=world)
    return q.get()

if __name__ == "__main__":
    what = sys.argv[1]
    if what == "equiv":
        a = launch(1, "sparse", 32, 32, 6); b = launch(2, "sparse", 32, 32, 6)
        print(json.dumps(a)); print(json.dumps(b))
    else:
        n_sub, d, steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(launch(int(sys.argv[5]), what, n_sub, d, steps)))
