"""The Triton backend: paged attention, rope + KV store and GDN kernels that read every size from device tensors,
so a whole decode step can be captured in a CUDA graph."""

from __future__ import annotations

import os

import torch

from radixc.engine.backends.base import AttentionBackend
from radixc.forward_batch import ForwardBatch
from radixc.ops.kernel_ops import BackendKernels, GDNKernels, lazy


class TritonBackend(AttentionBackend):
    """Triton paged extend / split-KV decode attention and Gated DeltaNet (chunked prefill, recurrent decode).
    Runs on CUDA, or on the CPU under `TRITON_INTERPRET=1` (for tests; never chosen by "auto" there)."""

    name = "triton"
    auto_rank = 20
    kernels = BackendKernels(
        extend_attention=lazy("radixc.ops.triton.attention_extend:paged_extend_attention"),
        decode_attention=lazy("radixc.ops.triton.attention_decode:paged_decode_attention"),
        rotary_and_store_kv=lazy("radixc.ops.triton.rope_kv_store:rotary_and_store_kv"),
        gdn=GDNKernels(
            causal_conv1d_extend=lazy("radixc.ops.triton.causal_conv1d:causal_conv1d_extend"),
            causal_conv1d_decode=lazy("radixc.ops.triton.causal_conv1d:causal_conv1d_decode"),
            chunk_gated_delta_rule=lazy("radixc.ops.triton.gdn_chunk:chunk_gated_delta_rule"),
            recurrent_gated_delta_rule=lazy("radixc.ops.triton.gdn_recurrent:recurrent_gated_delta_rule"),
            gated_recurrent_step=lazy("radixc.ops.triton.gdn_recurrent:gated_recurrent_step"),
        ),
    )

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not on {device.type}"

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Nothing to plan on the host: the kernels read lengths, pages and slots from the batch's device tensors
        and size their grids from tensor shapes, so one captured graph serves every batch of its size."""
