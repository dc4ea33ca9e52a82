"""The radixc custom ops and the layers that call them."""

from radixc.ops import library
from radixc.ops.attention import AttentionType, RadixAttention
from radixc.ops.linear_attention import RadixLinearAttention
from radixc.ops.native import kernels as _native_kernels  # noqa: F401  (registers the native kernel ops)
from radixc.ops.rotary import rotary_embedding

__all__ = ["AttentionType", "RadixAttention", "RadixLinearAttention", "library", "rotary_embedding"]
