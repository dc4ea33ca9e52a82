"""radixc: a torch.compile-centric attention engine for LLM inference."""

from radixc import passes
from radixc.engine import (
    AttentionBackend,
    ForwardBatch,
    ForwardMode,
    GDNPool,
    HybridAttnBackend,
    KVPool,
    NativeBackend,
    NativeGDNBackend,
    PoolExhaustedError,
    ReqToTokenPool,
)
from radixc.ops import AttentionType, RadixAttention, RadixLinearAttention, rotary_embedding

passes.install()

__all__ = [
    "AttentionBackend",
    "AttentionType",
    "ForwardBatch",
    "ForwardMode",
    "GDNPool",
    "HybridAttnBackend",
    "KVPool",
    "NativeBackend",
    "NativeGDNBackend",
    "PoolExhaustedError",
    "RadixAttention",
    "RadixLinearAttention",
    "ReqToTokenPool",
    "rotary_embedding",
]
