"""AttentionBackend: the seed interface, and how every radixc backend reaches its kernels.

A backend is one declaration: a subclass with a `name`, its primitive `kernels` (radixc.ops.kernel_ops), where it
runs (`unavailable_reason`) and the host work that is its own (`init_forward_metadata`, the CUDA-graph hooks).
Declaring the subclass registers its kernel ops for lowering and makes it choosable by name.

The layers call `forward` / `forward_gdn`, which call the *generic* radixc ops with this backend's name and the
batch's forward mode as constants; the lowering pass turns each generic node into this backend's kernel op, and
eager execution reaches the same kernel op through the generic op's implementation.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from radixc.cache_spec import KVCacheSpec
from radixc.forward_batch import ForwardBatch, ForwardMode
from radixc.ops.attention import AttentionType
from radixc.ops.kernel_ops import BackendKernels, define_backend_kernels

if TYPE_CHECKING:
    from radixc.ops.attention import RadixAttention
    from radixc.ops.linear_attention import RadixLinearAttention

# name -> backend class, in declaration order; filled by AttentionBackend.__init_subclass__
BACKENDS: dict[str, type[AttentionBackend]] = {}


class AttentionBackend(abc.ABC):
    """Abstract attention backend. `forward` dispatches on the batch's mode; IDLE batches return zeros."""

    name: ClassVar[str] = "abstract"
    # the backend's primitive kernels; a subclass that sets them is a concrete, registered backend
    kernels: ClassVar[BackendKernels | None] = None
    # "auto" picks the available backend with the lowest rank
    auto_rank: ClassVar[int] = 100

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kernels" in cls.__dict__ and cls.kernels is not None:
            if cls.name in BACKENDS:
                raise ValueError(f"attention backend {cls.name!r} is declared twice")
            define_backend_kernels(cls.name, cls.kernels)
            BACKENDS[cls.name] = cls

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """Why this backend cannot run on `device`, or None when it can."""
        return None

    @classmethod
    def cache_spec_problem(cls, spec: KVCacheSpec) -> str | None:
        """Why this backend cannot serve a model of cache spec `spec` (None: it can)."""
        if spec.is_encoder_only and not cls.has_encoder_attention():
            return "it has no cache-free attention for encoder-only models"
        return None

    def init_model(self, layers: Sequence[RadixAttention], req_to_token_pool, kv_pool) -> None:
        """Learn the full-attention layers this backend serves and the pools they read, once, before any batch
        (a planning backend prepares one plan per layer variant); nothing to learn by default."""

    @classmethod
    def has_gdn(cls) -> bool:
        return cls.kernels is not None and cls.kernels.gdn is not None

    def supports_cuda_graphs(self, mode: ForwardMode = ForwardMode.DECODE) -> bool:
        """Whether a step of `mode` on this backend can be captured in a CUDA graph (by default: when its kernels
        take every size from device tensors, in both modes)."""
        return self.kernels is not None and self.kernels.cudagraph_safe

    @classmethod
    def has_encoder_attention(cls) -> bool:
        return cls.kernels is not None and cls.kernels.ragged_attention is not None

    @abc.abstractmethod
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Prepare per-batch metadata before the model's attention layers run (once per batch)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        """Dispatch on forward_batch.forward_mode; IDLE returns zeros without compute."""
        mode = forward_batch.forward_mode
        if mode is ForwardMode.IDLE:
            return q.new_zeros(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        if mode is ForwardMode.DECODE:
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_extend(
        self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True, **kwargs
    ) -> torch.Tensor:
        """Attention for a prefill / extend step (or the whole sequence of an encoder-only layer)."""
        self._reject_extra(kwargs)
        if layer.attn_type is AttentionType.ENCODER_ONLY:
            return self._encoder_attention(q, k, v, layer, forward_batch)
        return self._paged_attention(q, k, v, layer, forward_batch, save_kv_cache, ForwardMode.EXTEND)

    def forward_decode(
        self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True, **kwargs
    ) -> torch.Tensor:
        """Attention for a decode step: one new token per request."""
        self._reject_extra(kwargs)
        if layer.attn_type is AttentionType.ENCODER_ONLY:
            raise ValueError(
                f"RadixAttention(layer_id={layer.layer_id}): an ENCODER_ONLY layer has no decode step"
            )
        return self._paged_attention(q, k, v, layer, forward_batch, save_kv_cache, ForwardMode.DECODE)

    def forward_gdn(
        self,
        layer: RadixLinearAttention,
        forward_batch: ForwardBatch,
        mixed_qkv: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
    ) -> torch.Tensor:
        """GDN linear attention for one layer, `[T, Hv * Dv]`; backends without GDN kernels refuse it."""
        if not self.has_gdn():
            raise NotImplementedError(
                f"{type(self).__name__} has no GDN kernels; run GDN layers through HybridAttnBackend with a GDN-capable"
                " backend (native or triton)"
            )
        fb = forward_batch
        conv_state, ssm_state = fb.gdn_pool.layer_states(layer.gdn_layer_idx)
        return torch.ops.radixc.gdn(
            mixed_qkv,
            a,
            b,
            layer.conv_weight,
            layer.A_log,
            layer.dt_bias,
            conv_state,
            ssm_state,
            fb.gdn_slots,
            fb.extend_start_loc,
            fb.extend_seq_lens,
            fb.extend_prefix_lens,
            num_k_heads=layer.num_k_heads,
            num_v_heads=layer.num_v_heads,
            head_k_dim=layer.head_k_dim,
            head_v_dim=layer.head_v_dim,
            backend=self.name,
            forward_mode=fb.forward_mode.value,
        )

    def _paged_attention(self, q, k, v, layer, fb: ForwardBatch, save_kv_cache: bool, mode: ForwardMode):
        """`radixc::attention` over the layer's paged KV buffers; returns `[T, Hq * Dv]`."""
        k_cache, v_cache = fb.token_to_kv_pool.layer_buffers(layer.layer_id)
        if k is not None:
            k, v = _heads(k, layer.tp_k_head_num), _heads(v, layer.tp_v_head_num)
        if layer.is_cross_attention:
            seq_lens, out_cache_loc, kv_start, causal = fb.encoder_lens, fb.encoder_out_cache_loc, None, False
        else:
            seq_lens, out_cache_loc, kv_start = fb.seq_lens, fb.out_cache_loc, fb.encoder_lens
            causal = layer.attn_type is AttentionType.DECODER or mode is ForwardMode.DECODE
        out = torch.ops.radixc.attention(
            _heads(q, layer.tp_q_head_num),
            k,
            v,
            k_cache,
            v_cache,
            fb.req_to_token_pool.req_to_token,
            fb.req_pool_indices,
            seq_lens,
            fb.extend_prefix_lens,
            fb.extend_seq_lens,
            fb.extend_start_loc,
            out_cache_loc,
            kv_start,
            scaling=layer.scaling,
            causal=causal,
            logit_cap=layer.logit_cap,
            sliding_window=layer.sliding_window_size,
            save_kv_cache=save_kv_cache,
            backend=self.name,
            forward_mode=mode.value,
        )
        return out.view(out.shape[0], -1)

    def _encoder_attention(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        """`radixc::encoder_attention` within each request's packed tokens (no cache); returns `[T, Hq * Dv]`."""
        if not self.has_encoder_attention():
            raise NotImplementedError(
                f"{type(self).__name__} has no cache-free attention for ENCODER_ONLY layers; use the native backend"
            )
        out = torch.ops.radixc.encoder_attention(
            _heads(q, layer.tp_q_head_num),
            _heads(k, layer.tp_k_head_num),
            _heads(v, layer.tp_v_head_num),
            fb.extend_start_loc,
            fb.extend_seq_lens,
            scaling=layer.scaling,
            logit_cap=layer.logit_cap,
            backend=self.name,
            forward_mode=ForwardMode.EXTEND.value,
        )
        return out.view(out.shape[0], -1)

    def _reject_extra(self, kwargs: dict) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unsupported attention arguments {sorted(kwargs)}")

    # CUDA graphs. A captured batch has a fixed size; padded requests read `seq_len_fill_value` keys from the
    # reserved padding slot. Backends whose kernels take every size from device tensors need no capture state.

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        """Value padded seq_lens take in a captured batch (1, so no kernel divides by zero)."""
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Allocate the buffers every capture shares (none when the kernels read sizes from the batch)."""

    def init_forward_metadata_capture_cuda_graph(
        self,
        bs: int,
        num_tokens: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        forward_mode: ForwardMode,
    ) -> None:
        """Set up the metadata a capture of batch size bs records (nothing to plan by default)."""

    def init_forward_metadata_replay_cuda_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_sum: int,
        forward_mode: ForwardMode,
        seq_lens_cpu: torch.Tensor | None,
    ) -> None:
        """Refresh the captured metadata before a replay (nothing to refresh by default)."""


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """x `[T, H * D]` (or already `[T, H, D]`) as `[T, H, D]`."""
    return x.view(x.shape[0], num_heads, -1)
