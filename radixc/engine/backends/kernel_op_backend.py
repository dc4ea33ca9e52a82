"""Backends whose kernels need no per-batch planning: they call the generic radixc ops under their own name."""

from __future__ import annotations

import torch

from radixc.engine.backends import op_calls
from radixc.engine.backends.base import AttentionBackend
from radixc.engine.forward_batch import ForwardBatch, ForwardMode


class KernelOpBackend(AttentionBackend):
    """Full attention through `radixc::attention` with `backend=self.name`; all metadata comes from the batch."""

    name = "abstract"

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        return None

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs) -> torch.Tensor:
        self._reject_extra(kwargs)
        return op_calls.attention(self.name, q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs) -> torch.Tensor:
        self._reject_extra(kwargs)
        return op_calls.attention(self.name, q, k, v, layer, forward_batch, save_kv_cache)

    def _reject_extra(self, kwargs: dict) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unsupported attention arguments {sorted(kwargs)}")

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    # Kernels read every length from device tensors, so capture and replay need no extra state.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        return None

    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens,
                                                 forward_mode: ForwardMode) -> None:  # fmt: skip
        return None

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens, seq_lens_sum,
                                                forward_mode: ForwardMode, seq_lens_cpu=None) -> None:  # fmt: skip
        return None


class GDNOnly:
    """Mixin for a GDN backend: GDN layers through `radixc::gdn`, full-attention layers refused."""

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} runs GDN layers only; pair it with a full-attention backend"
        )

    forward_decode = forward_extend

    def forward_gdn(self, layer, forward_batch, mixed_qkv, a, b) -> torch.Tensor:
        return op_calls.gdn(self.name, layer, forward_batch, mixed_qkv, a, b)
