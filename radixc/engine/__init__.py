"""The runtime: batches, memory pools, backends."""

from radixc.engine.backends import (
    AttentionBackend,
    HybridAttnBackend,
    NativeBackend,
    NativeGDNBackend,
    TritonBackend,
    TritonGDNBackend,
)
from radixc.engine.forward_batch import ForwardBatch, ForwardMode
from radixc.engine.memory_pool import GDNPool, KVPool, PoolExhaustedError, ReqToTokenPool

__all__ = [
    "AttentionBackend",
    "ForwardBatch",
    "ForwardMode",
    "GDNPool",
    "HybridAttnBackend",
    "KVPool",
    "NativeBackend",
    "NativeGDNBackend",
    "PoolExhaustedError",
    "ReqToTokenPool",
    "TritonBackend",
    "TritonGDNBackend",
]
