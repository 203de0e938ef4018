"""The worker ranks of a tensor-parallel pipeline: started, watched and stopped by the driver (rank 0).

Each worker is a fresh interpreter (``python -m tokenmill.parallel.worker``: nothing of the driver's process
or its ``__main__`` is re-run) that connects back to the driver over a local authenticated connection, joins
the ``torch.distributed`` group (gloo on CPU, NCCL on CUDA), builds its shard of the model and waits for
commands on that connection: the step's :class:`~tokenmill.model.batch.ForwardBatch`, a K/V move, or stop. Commands
travel on the pipe (no timeout while the server idles); tensors move only inside the forward, through the
group's collectives. A watcher thread on the driver reads each worker's pipe and notices a worker that dies:
the group is then *failed*, with a message naming the rank, and every later command raises it.

Workers die with the driver: each asks the kernel for SIGKILL when its parent exits (``PR_SET_PDEATHSIG``),
and a closed connection ends its loop.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Listener, wait
from typing import Callable

import torch.distributed as dist

log = logging.getLogger("tokenmill.parallel")
TIMEOUT_S = 120  # a collective that waits longer than this fails (a hung rank); a dead one fails at once


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or raised: the pipeline cannot run another step."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """Ranks ``1 .. world - 1`` of one pipeline, and the driver's membership of the process group."""

    def __init__(self, source, world: int, *, threads: int | None, device: str) -> None:
        if dist.is_initialized():
            raise ValueError("a tensor-parallel pipeline is already running in this process (one "
                             "torch.distributed group per process); close it first")
        self.world = world
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self.closing = False
        self._ready = [threading.Event() for _ in range(world)]
        self.weight_bytes: dict[int, int] = {}  # rank -> bytes of its shard's weights (as each worker measured)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        address = f"tcp://127.0.0.1:{free_port()}"
        key = os.urandom(16)
        self.procs: list[subprocess.Popen] = []
        self.pipes: list = []
        with Listener(("127.0.0.1", 0), authkey=key) as listener:
            host, port = listener.address
            env = dict(os.environ, TOKENMILL_TP_AUTHKEY=key.hex())
            for rank in range(1, world):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tokenmill.parallel.worker", f"{host}:{port}", str(rank), str(os.getpid())],
                    env=env))
            accepted: dict[int, object] = {}
            listener._listener._socket.settimeout(TIMEOUT_S)
            while len(accepted) < world - 1:
                try:
                    conn = listener.accept()
                except (OSError, EOFError) as exc:
                    self.close()
                    raise RankFailure(f"tensor-parallel workers did not connect: {exc}") from None
                rank = conn.recv()
                accepted[rank] = conn
                conn.send((source, rank, world, address, backend, threads))
        self.pipes = [accepted[r] for r in range(1, world)]
        self._watcher = threading.Thread(target=self._watch, name="tokenmill-tp-watch", daemon=True)
        self._watcher.start()
        try:
            dist.init_process_group(backend, init_method=address, rank=0, world_size=world,
                                    timeout=timedelta(seconds=TIMEOUT_S))
        except Exception as exc:
            self.close()
            raise self.error(exc) from None

    # ------------------------------------------------------------------ watching
    def _watch(self) -> None:
        waiting = {p: r for r, p in enumerate(self.pipes, start=1)}
        while waiting and not self.closing:
            for ready in wait(list(waiting), timeout=1.0):
                rank = waiting[ready]
                try:
                    kind, text = ready.recv()
                except (EOFError, OSError):  # the rank's end closed: it exited
                    waiting.pop(ready)
                    if not self.closing:
                        self._fail(self._died(rank))
                    continue
                if kind == "ready":
                    self.weight_bytes[rank] = text
                    self._ready[rank].set()
                else:
                    self._fail(f"tensor-parallel rank {rank} failed: {text}")

    def _died(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        try:
            code = proc.wait(2)
        except subprocess.TimeoutExpired:
            code = None
        how = (f"killed by signal {-code}" if code is not None and code < 0 else
               f"exit code {code}" if code is not None else "its connection closed")
        return f"tensor-parallel rank {rank} (pid {proc.pid}) died ({how})"

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("%s", message)
            for callback in list(self.on_failure):
                try:
                    callback(message)
                except Exception:  # a failing listener must not hide the failure from the others
                    log.exception("a tensor-parallel failure listener raised")

    def error(self, exc: BaseException | None = None) -> RankFailure:
        """The group's failure as an exception: a collective that raised usually means a rank died, so wait up
        to 2 s for the watcher to name it before reporting ``exc`` itself."""
        deadline = time.monotonic() + 2.0
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.failure is None and exc is not None:
            self._fail(f"tensor-parallel group failed: {type(exc).__name__}: {exc}")
        return RankFailure(self.failure or "tensor-parallel group failed")

    def wait_ready(self) -> None:
        """Until every worker has built its shard (or one failed)."""
        for rank in range(1, self.world):
            while not self._ready[rank].wait(0.1):
                if self.failure is not None:
                    raise RankFailure(self.failure)

    # ------------------------------------------------------------------ commands
    def send(self, command: tuple) -> None:
        """Send ``command`` to every worker; RankFailure if the group has failed."""
        if self.failure is not None:
            raise RankFailure(self.failure)
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)  # plain pickle: tensors by value
        try:
            for pipe in self.pipes:
                pipe.send_bytes(data)
        except (OSError, EOFError) as exc:
            raise self.error(exc) from None

    def close(self) -> None:
        """Stop the workers (a stop command, then terminate, then kill) and leave the process group."""
        if self.closing:
            return
        self.closing = True
        for pipe in self.pipes:
            try:
                pipe.send_bytes(pickle.dumps(("stop", None)))
            except (OSError, EOFError):
                pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for pipe in self.pipes:
            pipe.close()
        if dist.is_initialized():
            dist.destroy_process_group()
