"""Layers shared by the model families: uninitialised linear/embedding, norms, gated MLP, rotary, logits.

Parameters start uninitialised (like `torch.empty`): the loader or a preset's random init fills every one,
so building a model costs no init time, and it is built directly on its device, keeping parameter references
(RadixLinearAttention holds the conv weight, A_log and dt_bias by reference) valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from radixc.models.config import ModelConfig, RopeConfig
from radixc.models.parallel import (
    MergedLinear,
    NoInit,
    RowParallelLinear,
    current_tensor_parallel,
    split_heads,
)
from radixc.models.weights import CheckpointError, interleaved_rows
from radixc.ops.attention import RadixAttention
from radixc.ops.norm import rms_norm, rms_norm_reference
from radixc.ops.rotary import rotary_embedding

if TYPE_CHECKING:
    from radixc.forward_batch import ForwardBatch


class Linear(NoInit, nn.Linear):
    """nn.Linear without init."""


class Embedding(NoInit, nn.Embedding):
    """nn.Embedding without init."""


class Conv1d(NoInit, nn.Conv1d):
    """nn.Conv1d without init (GDN's depthwise conv; its weight is handed to RadixLinearAttention)."""


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled as Hugging Face does: zero_centered by (1 + weight) in float32
    (Gemma, Qwen3.5/Next), otherwise by weight after casting back to the input dtype (Llama, Qwen3)."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps, self.zero_centered = eps, zero_centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps, self.zero_centered)

    def per_head(self, x: torch.Tensor) -> torch.Tensor:
        """The same norm over each head of x `[T, H * head_dim]`, as the op `radixc::rms_norm` so that the
        q/k-norm + rope fusion pass can find it."""
        return rms_norm(x, self.weight, self.eps, self.zero_centered)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


class GatedRMSNorm(nn.Module):
    """norm(x) * silu(gate) over the last dim (GDN output): weight * normed in x's dtype, gate in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * normed.to(x.dtype)
        return (out * F.silu(gate.float())).to(x.dtype)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a config's `hidden_act` names."""
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"unsupported activation {name!r} (supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one `gate_up_proj` `[2 * intermediate, hidden]`;
    under tensor parallelism gate_up is column- and down row-parallel (each rank: intermediate / size);
    `reduce_output=False` leaves down's partial sum for the caller to all-reduce."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        bias: bool = False,
        reduce_output: bool = True,
    ):
        super().__init__()
        tp = current_tensor_parallel()
        rows = (tp.split(intermediate_size, f"GatedMLP's intermediate size {intermediate_size}"),)
        self.gate_up_proj = MergedLinear(
            hidden_size,
            (("gate_proj", intermediate_size), ("up_proj", intermediate_size)),
            bias=bias,
            shards=(rows, rows),
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, owner="GatedMLP", reduce=reduce_output
        )
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """Inverse frequencies `[rotary_dim / 2]` float32 for rope types default, linear and llama3 (as in HF)."""
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate smoothly in between
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen, high_freq_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise CheckpointError(f"unsupported rope type {rope.rope_type!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (`radixc::rotary_embedding`), cos/sin precomputed for every position."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, rope: RopeConfig):
        super().__init__()
        self.head_size, self.rotary_dim = head_size, rotary_dim
        inv_freq = rope_inv_freq(rope, rotary_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [max_position, rotary_dim] float32 = cat(cos, sin); not in the state dict (derived from the config)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    @classmethod
    def from_config(cls, config: ModelConfig) -> RotaryEmbedding:
        return cls(config.head_dim, config.rotary_dim, config.max_position_embeddings, config.rope)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_size, is_neox=True)

    def extra_repr(self) -> str:
        max_position = self.cos_sin_cache.shape[0]
        return f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, max_position={max_position}"


class Attention(nn.Module):
    """Decoder self-attention: fused qkv projection, optional per-head q/k RMSNorm, RoPE, attention, o_proj.

    output_gate (Qwen3.5 / Qwen3-Next): q_proj yields, per head, the query then a gate of the same size, and
    the attention output is multiplied by sigmoid(gate) before o_proj. Its rows are reordered at load time to
    [every head's query | every head's gate], so both are slices of the projection (no copy of either per step).
    Under tensor parallelism the layer holds this rank's heads (`split_heads`): qkv column-parallel by heads,
    o_proj row-parallel.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_id: int,
        rotary_emb: RotaryEmbedding,
        scaling: float | None = None,
        bias: bool = False,
        qk_norm: bool = False,
        zero_centered_norm: bool = False,
        output_gate: bool = False,
        logit_cap: float = 0.0,
        sliding_window: int = -1,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        heads = split_heads(
            num_heads, num_kv_heads, current_tensor_parallel(), f"Attention(layer_id={layer_id})"
        )
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.output_gate = output_gate
        q_rows = ((heads.q_start * head_dim, self.q_size),)
        q_reorder = None
        if output_gate:  # this rank's queries, then its gates, of [every query | every gate]
            q_rows += ((num_heads * head_dim + heads.q_start * head_dim, self.q_size),)
            q_reorder = interleaved_rows(num_heads, (head_dim, head_dim))
        kv_rows = ((heads.kv_start * head_dim, self.kv_size),)
        self.qkv_proj = MergedLinear(
            hidden_size,
            (
                ("q_proj", num_heads * head_dim * (2 if output_gate else 1)),
                ("k_proj", num_kv_heads * head_dim),
                ("v_proj", num_kv_heads * head_dim),
            ),
            bias,
            shards=(q_rows, kv_rows, kv_rows),
            reorders=(q_reorder, None, None),
        )
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden_size, bias=bias, owner=f"Attention(layer_id={layer_id})"
        )
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps, zero_centered_norm)
            self.k_norm = RMSNorm(head_dim, norm_eps, zero_centered_norm)
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(
            self.num_heads,
            head_dim,
            head_dim**-0.5 if scaling is None else scaling,
            self.num_kv_heads,
            layer_id,
            logit_cap=logit_cap,
            sliding_window_size=sliding_window,
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        gate = None
        if self.output_gate:
            q, gate, k, v = qkv.split([self.q_size, self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm.per_head(q), self.k_norm.per_head(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, forward_batch)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


def logits_rows(hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
    """The rows of `hidden` `[T, hidden]` whose logits the batch asks for (`logits_indices`; None: all)."""
    if forward_batch.logits_indices is None:
        return hidden
    return hidden[forward_batch.logits_indices]


def compute_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Float32 logits `[R, vocab]` of hidden `[R, hidden]`; softcap: cap * tanh(logits / cap) (Gemma 2)."""
    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits
