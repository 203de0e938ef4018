"""``tokenmill.parallel``: tensor parallelism over ``torch.distributed`` (the weight split lives in
:mod:`tokenmill.model.shard`; the worker ranks and the driver's runner here)."""
from tokenmill.parallel.group import RankFailure, WorkerGroup
from tokenmill.parallel.runner import ParallelRunner

__all__ = ["ParallelRunner", "RankFailure", "WorkerGroup"]
