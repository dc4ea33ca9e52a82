"""The runtime: pools, backends, batches, scheduling, sampling and the LLM engine."""

from radixc.engine.backends import AttentionBackend, HybridAttnBackend, NativeBackend, TritonBackend
from radixc.engine.gdn_checkpoints import HybridPrefixCache
from radixc.engine.memory_pool import GDNPool, KVPool, PoolExhaustedError, ReqToTokenPool
from radixc.engine.prefix_cache import PrefixCache, PrefixCacheStats
from radixc.forward_batch import ForwardBatch, ForwardMode

__all__ = [
    "AttentionBackend",
    "ForwardBatch",
    "ForwardMode",
    "GDNPool",
    "HybridAttnBackend",
    "HybridPrefixCache",
    "KVPool",
    "NativeBackend",
    "PoolExhaustedError",
    "PrefixCache",
    "PrefixCacheStats",
    "ReqToTokenPool",
    "TritonBackend",
]
