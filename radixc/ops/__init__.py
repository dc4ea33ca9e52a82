"""The radixc custom ops, the layers that call them, and the kernels they lower to."""

from radixc.ops import library
from radixc.ops.attention import AttentionType, RadixAttention
from radixc.ops.linear_attention import RadixLinearAttention
from radixc.ops.rotary import rotary_embedding

__all__ = ["AttentionType", "RadixAttention", "RadixLinearAttention", "library", "rotary_embedding"]
