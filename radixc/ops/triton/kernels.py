"""Registers the Triton backend's kernel ops. Defining them needs no triton; calling them does."""

from __future__ import annotations

from radixc.ops import triton as triton_kernels
from radixc.ops.kernel_ops import BackendKernels, define_backend_kernels


def _extend_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                      extend_seq_lens, extend_start_loc, **kwargs):  # fmt: skip
    return triton_kernels.paged_extend_attention(
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
        extend_start_loc, **kwargs,
    )  # fmt: skip


def _decode_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                      extend_seq_lens, extend_start_loc, *, causal, **kwargs):  # fmt: skip
    # one query per request at position seq_lens - 1: causal or not, it sees every key of its request
    return triton_kernels.paged_decode_attention(
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, **kwargs
    )


def _rotary_and_store_kv(*args, **kwargs):
    return triton_kernels.rotary_and_store_kv(*args, **kwargs)


define_backend_kernels(
    BackendKernels(
        name="triton",
        extend_attention=_extend_attention,
        decode_attention=_decode_attention,
        ragged_attention=None,  # no cache-free Triton attention yet: encoder-only models run on "native"
        rotary_and_store_kv=_rotary_and_store_kv,
        gdn_kernels=triton_kernels,
        cudagraph_safe=True,  # all sizes come from tensors on the device: capturable
    )
)
