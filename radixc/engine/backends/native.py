"""The torch-native backend: full attention and GDN in plain torch on any device (the reference and CPU path)."""

from __future__ import annotations

from radixc.engine.backends.base import AttentionBackend
from radixc.forward_batch import ForwardBatch
from radixc.ops import rotary
from radixc.ops.kernel_ops import BackendKernels, GDNKernels
from radixc.ops.native import attention, gdn

_NOT_CAPTURABLE = "the native backend cannot run inside CUDA graphs (its kernels read lengths on the host)"


class NativeBackend(AttentionBackend):
    """Torch-native paged attention and Gated DeltaNet. Its kernels size their work on the host (`.item()` on
    lengths), so it needs no planning and is never captured: its kernel ops carry `cudagraph_unsafe`."""

    name = "native"
    auto_rank = 90
    kernels = BackendKernels(
        extend_attention=attention.paged_attention,
        decode_attention=attention.paged_decode_attention,
        ragged_attention=attention.ragged_attention,
        rotary_and_store_kv=rotary.rotary_and_store_kv,
        gdn=GDNKernels(
            causal_conv1d_extend=gdn.causal_conv1d_extend,
            causal_conv1d_decode=gdn.causal_conv1d_decode,
            chunk_gated_delta_rule=gdn.chunk_gated_delta_rule,
            recurrent_gated_delta_rule=gdn.recurrent_gated_delta_rule,
        ),
        cudagraph_safe=False,
    )

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Nothing to plan: every native kernel derives its work from the batch's tensors."""

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        raise NotImplementedError(_NOT_CAPTURABLE)

    def init_forward_metadata_capture_cuda_graph(self, *args, **kwargs) -> None:
        raise NotImplementedError(_NOT_CAPTURABLE)

    def init_forward_metadata_replay_cuda_graph(self, *args, **kwargs) -> None:
        raise NotImplementedError(_NOT_CAPTURABLE)
