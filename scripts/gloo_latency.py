"""Latency of one gloo all-reduce between two local processes of one thread (docs/distributed.md).

    python scripts/gloo_latency.py
"""
import os, sys, time, torch, torch.distributed as dist
import torch.multiprocessing as mp
def run(rank):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=2)
    x = torch.randn(1, 576)
    for _ in range(20): dist.all_reduce(x)
    t = time.perf_counter()
    for _ in range(500): dist.all_reduce(x)
    if rank == 0: print("all_reduce [1,576] us", (time.perf_counter()-t)/500*1e6)
    x = torch.randn(64, 576)
    t = time.perf_counter()
    for _ in range(200): dist.all_reduce(x)
    if rank == 0: print("all_reduce [64,576] us", (time.perf_counter()-t)/200*1e6)
    dist.destroy_process_group()
if __name__ == "__main__":
    mp.spawn(run, nprocs=2)
