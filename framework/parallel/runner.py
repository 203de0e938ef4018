"""The driver's model runner of a tensor-parallel pipeline: every forward and K/V move is sent to the worker
ranks first, then run here on rank 0's shard; the collectives inside the forward meet the workers' own."""
from __future__ import annotations

from typing import Callable

from tokenmill.model.batch import ForwardBatch
from tokenmill.model.runner import ModelRunner, RunnerOutput
from tokenmill.parallel.group import WorkerGroup


class ParallelRunner(ModelRunner):
    """A :class:`ModelRunner` over rank 0's shard that drives the ranks of ``group``. Once a rank has failed,
    every forward raises :class:`~tokenmill.parallel.group.RankFailure` naming it."""

    def __init__(self, group: WorkerGroup, model, pool, **kwargs) -> None:
        super().__init__(model, pool, **kwargs)
        self.group = group

    @property
    def fatal(self) -> str | None:
        """Why the pipeline can run no more steps (a rank died or raised), or None."""
        return self.group.failure

    def weight_bytes(self) -> list[int]:
        """Bytes of each rank's weights, rank 0 first."""
        from tokenmill.model.loader import weight_bytes

        return [weight_bytes(self.model)] + [self.group.weight_bytes[r] for r in range(1, self.group.world)]

    @property
    def on_failure(self) -> list[Callable[[str], None]]:
        """Callbacks run (on a watcher thread) with the message when a rank fails."""
        return self.group.on_failure

    def forward(self, batch: ForwardBatch) -> RunnerOutput:
        self.group.send(("forward", batch))
        try:
            return super().forward(batch)
        except Exception as exc:  # a collective failed: a rank is gone or broken
            raise self.group.error(exc) from None

    def tune_cpu_gemm(self, steps: int = 5) -> None:
        """Tensor-parallel ranks keep the default small-row GEMM path: a timed step here would also time the
        workers, whose own choice this rank cannot set."""
        return None

    def move_kv(self, block_table: list[int], src: list[int], dst: list[int]) -> None:
        self.group.send(("move_kv", (block_table, src, dst)))
        super().move_kv(block_table, src, dst)

    def close(self) -> None:
        self.group.close()
