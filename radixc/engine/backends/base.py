"""AttentionBackend: the interface every attention backend implements (per-batch metadata, kernels, CUDA graphs)."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch

from radixc.engine.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixc.ops.attention import RadixAttention
    from radixc.ops.linear_attention import RadixLinearAttention


class AttentionBackend(abc.ABC):
    """Abstract attention backend. `forward` dispatches on the batch's mode; IDLE batches return zeros."""

    name: str = "abstract"

    @abc.abstractmethod
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Prepare per-batch metadata before the model's attention layers run (once per batch)."""

    @abc.abstractmethod
    def forward_decode(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True,
                       **kwargs) -> torch.Tensor:  # fmt: skip
        """Attention for a decode step (one new token per request)."""

    @abc.abstractmethod
    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True,
                       **kwargs) -> torch.Tensor:  # fmt: skip
        """Attention for a prefill / extend step."""

    def forward(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True,
                **kwargs) -> torch.Tensor:  # fmt: skip
        """Dispatch on forward_batch.forward_mode; IDLE returns zeros without compute."""
        mode = forward_batch.forward_mode
        if mode is ForwardMode.IDLE:
            return q.new_zeros(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        if mode is ForwardMode.DECODE:
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_gdn(self, layer: RadixLinearAttention, forward_batch: ForwardBatch, mixed_qkv: torch.Tensor,
                    a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """GDN linear attention for one layer; only hybrid-capable backends implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no GDN linear attention; use HybridAttnBackend")

    @abc.abstractmethod
    def get_cuda_graph_seq_len_fill_value(self) -> int:
        """Value padded seq_lens take in a captured batch (1, so no kernel divides by zero)."""

    @abc.abstractmethod
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Allocate the buffers CUDA-graph captures share."""

    @abc.abstractmethod
    def init_forward_metadata_capture_cuda_graph(self, bs: int, num_tokens: int, req_pool_indices: torch.Tensor,
                                                 seq_lens: torch.Tensor, forward_mode: ForwardMode) -> None:  # fmt: skip
        """Set up metadata for capturing a CUDA graph of batch size bs."""

    @abc.abstractmethod
    def init_forward_metadata_replay_cuda_graph(self, bs: int, req_pool_indices: torch.Tensor,
                                                seq_lens: torch.Tensor, seq_lens_sum: int,
                                                forward_mode: ForwardMode,
                                                seq_lens_cpu: torch.Tensor | None) -> None:  # fmt: skip
        """Update metadata before replaying a captured CUDA graph."""
