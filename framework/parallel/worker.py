"""A tensor-parallel worker rank: its shard of the model, its heads' slice of the KV pool, and a loop that runs
the driver's commands (see :mod:`tokenmill.parallel.group`)."""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
from datetime import timedelta

import torch


class ModelPart:
    """A worker rank's shard: the model quantized and sliced as the driver's is, and what its runner needs."""

    def __init__(self, source, rank: int, world: int) -> None:
        from tokenmill.host import instantiate, make_plugin_manager
        from tokenmill.model import load_model
        from tokenmill.model.shard import shard_model
        from tokenmill.pipeline import quantize_model
        from tokenmill.spec import load_spec

        self.spec = spec = load_spec(source)
        named = {p.name: instantiate(p.obj, p.options) for p in spec.plugins}
        pm = make_plugin_manager(list(named.items()), spec.order)  # for the quantize_layer hooks only
        self.loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device, progress=False)
        quantize_model(pm, self.loaded, False)
        self.shard = shard_model(self.loaded.model, rank, world)

    def runner(self, block_size: int, num_blocks: int, max_len: int):
        """The rank's runner over a pool of the driver's geometry holding this rank's KV heads."""
        from tokenmill.hooktypes import KVPool
        from tokenmill.model import ModelRunner

        model, spec = self.loaded.model, self.spec
        kv = ModelRunner.kv_spec(model, dtype=self.loaded.dtype, device=self.loaded.device, max_model_len=max_len,
                                 max_num_seqs=1)
        shape = (block_size * num_blocks, kv.num_kv_heads, kv.head_dim)
        make = lambda: torch.zeros(shape, dtype=kv.dtype, device=kv.device)  # noqa: E731
        pool = KVPool([make() for _ in range(kv.num_layers)], [make() for _ in range(kv.num_layers)],
                      block_size=block_size, num_blocks=num_blocks)
        return ModelRunner(model, pool, attention=spec.attention, max_model_len=max_len, shard=self.shard,
                           cpu_gemm=spec.cpu_gemm)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent exits (Linux), so no rank outlives its driver."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the driver exited before the request took effect
        os._exit(1)


def main(argv: list[str]) -> None:
    """``python -m tokenmill.parallel.worker HOST:PORT RANK PARENT_PID``: connect to the driver (the authkey is in
    ``TOKENMILL_TP_AUTHKEY``), build the rank's shard, then run commands until ``stop`` or a closed connection."""
    from multiprocessing.connection import Client

    where, rank, parent = argv[0], int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    host, port = where.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop("TOKENMILL_TP_AUTHKEY")))
    conn.send(rank)
    try:
        import torch.distributed as dist

        from tokenmill.parallel.group import TIMEOUT_S

        source, rank, world, address, backend, threads = conn.recv()
        torch.set_num_threads(threads or 1)
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S))
        part = ModelPart(source, rank, world)
        from tokenmill.model.loader import weight_bytes

        conn.send(("ready", weight_bytes(part.loaded.model)))
        kind, geometry = pickle.loads(conn.recv_bytes())
        assert kind == "pool", kind
        runner = part.runner(*geometry)
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the driver is gone
                break
            if kind == "stop":
                break
            if kind == "forward":
                runner.forward(payload)
            elif kind == "move_kv":
                runner.move_kv(*payload)
            else:
                raise ValueError(f"unknown tensor-parallel command {kind!r}")
    except BaseException as exc:  # report it to the driver, which fails the pipeline naming this rank
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
