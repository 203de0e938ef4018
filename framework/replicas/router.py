"""The Ray Serve request router of the engine replicas: the replica with the request's prefix, else the least
loaded one.

Ray Serve asks ``choose_replicas`` for ranks of candidates and sends the request to the least loaded
replica of the first rank that has room (it knows each replica's ongoing requests). This router remembers,
for every prefix key it has routed (``prefix.py``), the replica it went to. A request whose longest known
prefix covers at least ``min_match`` of its text goes to that replica first, unless that replica has
``imbalance`` more requests in flight than the least loaded one; otherwise every replica is one rank
and the least loaded wins.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tokenmill.replicas.forward import ForwardedRequest
from tokenmill.replicas.prefix import CHUNK


def _request(pending: PendingRequest | None) -> ForwardedRequest | None:
    if pending is None:
        return None
    return next((a for a in pending.args if isinstance(a, ForwardedRequest)), None)


class PrefixRouter(RequestRouter):
    def initialize_state(self, min_match: float = 0.5, imbalance: int = 8, max_keys: int = 1 << 18) -> None:
        self.min_match = min_match
        self.imbalance = imbalance
        self.max_keys = max_keys
        self.owner: OrderedDict[bytes, ReplicaID] = OrderedDict()
        self.routed_by_prefix = 0
        self.routed_by_load = 0

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def holder(self, req: ForwardedRequest | None, candidates: list[RunningReplica]) -> RunningReplica | None:
        """The candidate holding the longest prefix of ``req`` that covers at least ``min_match`` of it."""
        if req is None or not req.prefix.keys:
            return None
        by_id = {r.replica_id: r for r in candidates}
        keys = req.prefix.keys
        for i in range(len(keys) - 1, -1, -1):
            rid = self.owner.get(keys[i])
            if rid is None or rid not in by_id:
                continue
            covered = min(req.prefix.chars, (i + 1) * CHUNK)
            return by_id[rid] if covered >= self.min_match * req.prefix.chars else None
        return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        best = self.holder(_request(pending_request), candidate_replicas)
        if best is not None and candidate_replicas:
            least = min(self._load(r) for r in candidate_replicas)
            if self._load(best) - least <= self.imbalance:
                self.routed_by_prefix += 1
                return [[best], [r for r in candidate_replicas if r is not best]]
        self.routed_by_load += 1
        return [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        req = _request(pending_request)
        if req is None:
            return
        for key in req.prefix.keys:  # this replica now holds (or is computing) these prefixes
            self.owner[key] = replica_id
            self.owner.move_to_end(key)
        while len(self.owner) > self.max_keys:
            self.owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, rid in self.owner.items() if rid == replica_id]:
            del self.owner[key]
