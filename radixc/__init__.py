"""radixc: a torch.compile-centric attention engine for LLM inference."""

from radixc import passes
from radixc.cache_spec import KVCacheSpec
from radixc.engine import (
    AttentionBackend,
    ForwardBatch,
    ForwardMode,
    GDNPool,
    HybridAttnBackend,
    HybridPrefixCache,
    KVPool,
    NativeBackend,
    PoolExhaustedError,
    PrefixCacheStats,
    ReqToTokenPool,
    TritonBackend,
)
from radixc.engine.llm import LLM
from radixc.engine.request import RequestOutput, SamplingParams, TokenUpdate
from radixc.engine.step_stats import StepStats
from radixc.models import CheckpointError, build_preset, list_presets, load_model
from radixc.ops import AttentionType, RadixAttention, RadixLinearAttention, rotary_embedding

passes.install()

__all__ = [
    "LLM",
    "AttentionBackend",
    "AttentionType",
    "CheckpointError",
    "ForwardBatch",
    "ForwardMode",
    "GDNPool",
    "HybridAttnBackend",
    "HybridPrefixCache",
    "KVPool",
    "KVCacheSpec",
    "NativeBackend",
    "PoolExhaustedError",
    "PrefixCacheStats",
    "RadixAttention",
    "RequestOutput",
    "SamplingParams",
    "StepStats",
    "TokenUpdate",
    "TritonBackend",
    "build_preset",
    "list_presets",
    "load_model",
    "RadixLinearAttention",
    "ReqToTokenPool",
    "rotary_embedding",
]
