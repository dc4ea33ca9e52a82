"""Attention backends: the seed ABC, torch-native and Triton full attention and GDN, and the hybrid composite."""

from radixc.engine.backends.base import AttentionBackend
from radixc.engine.backends.hybrid import HybridAttnBackend
from radixc.engine.backends.native import NativeBackend, NativeGDNBackend
from radixc.engine.backends.triton import TritonBackend, TritonGDNBackend

__all__ = [
    "AttentionBackend",
    "HybridAttnBackend",
    "NativeBackend",
    "NativeGDNBackend",
    "TritonBackend",
    "TritonGDNBackend",
]
