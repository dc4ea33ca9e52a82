"""KVCacheSpec: the cache layout a model asks the engine for (read by the layers' checks, the pools and limits)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """What the engine must allocate for a model: KV pool geometry and, for hybrids, the GDN state geometry.

    `num_layers` sizes the KV pool so that `k_buffer[layer_id]` exists for every decoder layer index;
    only `full_attention_layer_ids` (softmax-attention layers, sliding-window ones included) need a buffer.
    An encoder-only model has no attention layer ids: it needs no KV pool.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    full_attention_layer_ids: tuple[int, ...]
    sliding_window: int | None = None
    sliding_window_layer_ids: tuple[int, ...] = ()
    gdn_layer_ids: tuple[int, ...] = ()
    conv_dim: int = 0
    conv_kernel_size: int = 0
    num_k_heads: int = 0
    num_v_heads: int = 0
    head_k_dim: int = 0
    head_v_dim: int = 0

    @property
    def num_gdn_layers(self) -> int:
        return len(self.gdn_layer_ids)

    @property
    def needs_kv_cache(self) -> bool:
        return bool(self.full_attention_layer_ids)

    @property
    def is_encoder_only(self) -> bool:
        """No KV cache and no GDN state: every request is a single cache-free forward."""
        return not self.needs_kv_cache and not self.gdn_layer_ids
