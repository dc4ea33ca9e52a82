"""Torch-native backends: full attention and GDN on any device (the reference and the CPU path)."""

from __future__ import annotations

import torch

from radixc.engine.backends import op_calls
from radixc.engine.backends.base import AttentionBackend
from radixc.engine.forward_batch import ForwardBatch, ForwardMode


class _KernelOpBackend(AttentionBackend):
    """A backend whose kernels need no per-batch planning: it calls the generic ops under its own name."""

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


class NativeBackend(_KernelOpBackend):
    """Torch-native paged attention. Its kernels size work on the host, so it is never captured in a CUDA graph."""

    name = "native"

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        raise NotImplementedError(
            "NativeBackend cannot run inside CUDA graphs (its kernels read lengths on the host)"
        )

    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens,
                                                 forward_mode: ForwardMode) -> None:  # fmt: skip
        self.init_cuda_graph_state(bs, num_tokens)

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens, seq_lens_sum,
                                                forward_mode: ForwardMode, seq_lens_cpu=None) -> None:  # fmt: skip
        self.init_cuda_graph_state(bs, bs)


class NativeGDNBackend(NativeBackend):
    """Torch-native Gated DeltaNet: chunked delta rule for extend, recurrent for decode."""

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs) -> torch.Tensor:
        raise NotImplementedError(
            "NativeGDNBackend runs GDN layers only; pair it with a full-attention backend"
        )

    forward_decode = forward_extend

    def forward_gdn(self, layer, forward_batch, mixed_qkv, a, b) -> torch.Tensor:
        return op_calls.gdn(self.name, layer, forward_batch, mixed_qkv, a, b)
