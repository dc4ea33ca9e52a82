"""AttentionType and RadixAttention: the full-attention layer, checked at trace time, run by the batch's backend."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch
from torch import nn

from radixc.ops import library  # noqa: F401  (defines the radixc ops)

if TYPE_CHECKING:
    from radixc.forward_batch import ForwardBatch


class AttentionType(str, enum.Enum):
    """Attention variant of a layer; string values so torch.compile treats them as constants."""

    DECODER = "decoder"
    DECODER_BIDIRECTIONAL = "decoder_bidirectional"
    ENCODER_ONLY = "encoder_only"


class RadixAttention(nn.Module):
    """Attention over a paged KV cache (or, for ENCODER_ONLY, within each request) delegated to the backend."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        logit_cap: float = 0.0,
        v_head_dim: int = -1,
        sliding_window_size: int = -1,
        is_cross_attention: bool = False,
        attn_type: AttentionType = AttentionType.DECODER,
    ):
        super().__init__()
        attn_type = AttentionType(attn_type)
        where = f"RadixAttention(layer_id={layer_id})"
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"{where}: num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
            )
        if head_dim <= 0 or layer_id < 0:
            raise ValueError(f"{where}: head_dim and layer_id must be positive / non-negative")
        if attn_type is AttentionType.ENCODER_ONLY and (sliding_window_size > 0 or is_cross_attention):
            raise ValueError(f"{where}: ENCODER_ONLY supports neither sliding windows nor cross-attention")
        if is_cross_attention and sliding_window_size > 0:
            raise ValueError(f"{where}: cross-attention has no sliding window")
        self.tp_q_head_num = num_heads
        self.tp_k_head_num = num_kv_heads
        self.tp_v_head_num = num_kv_heads
        self.head_dim = head_dim
        self.qk_head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim == -1 else v_head_dim
        self.scaling = float(scaling)
        self.layer_id = layer_id
        self.logit_cap = float(logit_cap)
        self.sliding_window_size = sliding_window_size if sliding_window_size > 0 else -1
        self.is_cross_attention = is_cross_attention
        self.attn_type = attn_type

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        """Attention of q `[T, Hq*D]` (or `[T, Hq, D]`) -> `[T, Hq*Dv]`; k = v = None reads the cache only."""
        self._check_inputs(q, k, v, forward_batch)
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch, save_kv_cache, **kwargs)

    def _check_inputs(self, q, k, v, forward_batch: ForwardBatch) -> None:
        """Shape, dtype and pool checks; they read static sizes only, so they run once at trace time."""
        where = f"RadixAttention(layer_id={self.layer_id})"
        _check_heads(where, "q", q, self.tp_q_head_num, self.qk_head_dim)
        if (k is None) != (v is None):
            raise ValueError(f"{where}: k and v must both be given or both be None (cross-layer KV sharing)")
        if k is not None:
            _check_heads(where, "k", k, self.tp_k_head_num, self.qk_head_dim)
            _check_heads(where, "v", v, self.tp_v_head_num, self.v_head_dim)
            for name, t in (("k", k), ("v", v)):
                if t.dtype != q.dtype:
                    raise TypeError(f"{where}: {name} has dtype {t.dtype}, q has {q.dtype}")
        if self.attn_type is AttentionType.ENCODER_ONLY:
            if k is None:
                raise ValueError(f"{where}: ENCODER_ONLY attention needs k and v (it has no KV cache)")
            return
        if forward_batch.forward_mode.is_idle():
            return
        pool = forward_batch.token_to_kv_pool
        if pool is None:
            raise ValueError(f"{where}: the forward batch has no KV pool")
        k_cache, v_cache = pool.layer_buffers(self.layer_id)
        if (
            k_cache.shape[1:] != (self.tp_k_head_num, self.qk_head_dim)
            or v_cache.shape[-1] != self.v_head_dim
        ):
            raise ValueError(
                f"{where}: KV pool layer holds {k_cache.shape[1]} heads of dim {k_cache.shape[2]} (v dim "
                f"{v_cache.shape[-1]}), the layer expects {self.tp_k_head_num} of dim {self.qk_head_dim} "
                f"(v dim {self.v_head_dim})"
            )
        if k_cache.dtype != q.dtype:
            raise TypeError(f"{where}: q has dtype {q.dtype}, the KV pool holds {k_cache.dtype}")
        if self.is_cross_attention and forward_batch.encoder_lens is None:
            raise ValueError(f"{where}: cross-attention needs forward_batch.encoder_lens")

    def extra_repr(self) -> str:
        parts = [
            f"layer_id={self.layer_id}",
            f"q_heads={self.tp_q_head_num}",
            f"kv_heads={self.tp_k_head_num}",
            f"head_dim={self.qk_head_dim}",
            f"v_head_dim={self.v_head_dim}",
            f"scaling={self.scaling:.4g}",
            f"attn_type={self.attn_type.value}",
        ]
        if self.logit_cap > 0:
            parts.append(f"logit_cap={self.logit_cap}")
        if self.sliding_window_size > 0:
            parts.append(f"sliding_window_size={self.sliding_window_size}")
        if self.is_cross_attention:
            parts.append("cross_attention=True")
        return ", ".join(parts)


def _check_heads(where: str, name: str, x: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """x must be `[T, num_heads * head_dim]` or `[T, num_heads, head_dim]`."""
    ok = (x.dim() == 2 and x.shape[1] == num_heads * head_dim) or (
        x.dim() == 3 and tuple(x.shape[1:]) == (num_heads, head_dim)
    )
    if not ok:
        raise ValueError(
            f"{where}: expected {name} with {num_heads} heads of dim {head_dim} "
            f"([T, {num_heads * head_dim}] or [T, {num_heads}, {head_dim}]), got {list(x.shape)}"
        )
