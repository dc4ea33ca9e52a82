"""The radixc custom ops and the layers that call them."""

from radixc.ops import library
from radixc.ops.attention import AttentionType, RadixAttention
from radixc.ops.linear_attention import RadixLinearAttention
from radixc.ops.native import kernels as _native_kernels  # noqa: F401  (registers the native kernel ops)
from radixc.ops.rotary import rotary_embedding
from radixc.ops.triton import kernels as _triton_kernels  # noqa: F401  (registers the Triton kernel ops)

__all__ = ["AttentionType", "RadixAttention", "RadixLinearAttention", "library", "rotary_embedding"]
