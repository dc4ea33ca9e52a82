"""Registers the native backend's kernel ops (torch-native kernels, any device)."""

from __future__ import annotations

from radixc.ops import rotary
from radixc.ops.kernel_ops import BackendKernels, define_backend_kernels
from radixc.ops.native import gdn
from radixc.ops.native.attention import paged_attention, ragged_attention

define_backend_kernels(
    BackendKernels(
        name="native",
        extend_attention=paged_attention,
        decode_attention=paged_attention,
        ragged_attention=ragged_attention,
        rotary_and_store_kv=rotary.rotary_and_store_kv,
        gdn_kernels=gdn,
        cudagraph_safe=False,  # native kernels size their work on the host (lengths read with .item())
    )
)
