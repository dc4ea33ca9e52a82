"""HybridAttnBackend: full-attention layers to one backend, GDN layers to another.

Under torch.compile the delegation runs at trace time (the layer id is a constant), so the compiled graph holds
each sub-backend's ops directly and no dispatch survives at run time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from radixc.engine.backends.base import AttentionBackend
from radixc.forward_batch import ForwardBatch, ForwardMode


class HybridAttnBackend(AttentionBackend):
    """Composite backend for hybrid full-attention + GDN models."""

    def __init__(
        self,
        full_attn_backend: AttentionBackend,
        gdn_backend: AttentionBackend,
        full_attn_layer_ids: Iterable[int],
    ):
        if not gdn_backend.has_gdn():
            raise ValueError(f"HybridAttnBackend: {type(gdn_backend).__name__} has no GDN kernels")
        self.full_attn_backend = full_attn_backend
        self.gdn_backend = gdn_backend
        self.full_attn_layer_ids = frozenset(full_attn_layer_ids)

    @property
    def name(self) -> str:
        return self.full_attn_backend.name

    @property
    def _backends(self) -> tuple[AttentionBackend, ...]:
        """Each distinct sub-backend once (the same instance may serve both roles)."""
        full, gdn = self.full_attn_backend, self.gdn_backend
        return (full,) if gdn is full else (full, gdn)

    def _full(self, layer) -> AttentionBackend:
        if layer.layer_id not in self.full_attn_layer_ids:
            raise ValueError(
                f"HybridAttnBackend: layer_id={layer.layer_id} is not a full-attention layer "
                f"(full-attention layers: {sorted(self.full_attn_layer_ids)})"
            )
        return self.full_attn_backend

    def init_model(self, layers, req_to_token_pool, kv_pool) -> None:
        full = [layer for layer in layers if layer.layer_id in self.full_attn_layer_ids]
        for backend in self._backends:
            backend.init_model(full, req_to_token_pool, kv_pool)

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        for backend in self._backends:
            backend.init_forward_metadata(forward_batch)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs) -> torch.Tensor:
        return self._full(layer).forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs) -> torch.Tensor:
        return self._full(layer).forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_gdn(self, layer, forward_batch, mixed_qkv, a, b) -> torch.Tensor:
        return self.gdn_backend.forward_gdn(layer, forward_batch, mixed_qkv, a, b)

    def has_gdn(self) -> bool:
        return True

    def supports_cuda_graphs(self, mode: ForwardMode = ForwardMode.DECODE) -> bool:
        return all(backend.supports_cuda_graphs(mode) for backend in self._backends)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return self.full_attn_backend.get_cuda_graph_seq_len_fill_value()

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        for backend in self._backends:
            backend.init_cuda_graph_state(max_bs, max_num_tokens)

    def init_forward_metadata_capture_cuda_graph(
        self, bs, num_tokens, req_pool_indices, seq_lens, forward_mode: ForwardMode
    ) -> None:
        for backend in self._backends:
            backend.init_forward_metadata_capture_cuda_graph(
                bs, num_tokens, req_pool_indices, seq_lens, forward_mode
            )

    def init_forward_metadata_replay_cuda_graph(
        self, bs, req_pool_indices, seq_lens, seq_lens_sum, forward_mode: ForwardMode, seq_lens_cpu=None
    ) -> None:
        for backend in self._backends:
            backend.init_forward_metadata_replay_cuda_graph(
                bs, req_pool_indices, seq_lens, seq_lens_sum, forward_mode, seq_lens_cpu
            )
