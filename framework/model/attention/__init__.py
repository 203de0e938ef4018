"""Attention backends: the protocol (:mod:`.base`), today's gather + SDPA and the in-place paged backend."""
from tokenmill.model.attention.base import (ENTRY_POINT_GROUP, AttentionBackend, AttentionLayout, backend_class,
                                            discover_backends)

__all__ = ["ENTRY_POINT_GROUP", "AttentionBackend", "AttentionLayout", "backend_class", "discover_backends"]
