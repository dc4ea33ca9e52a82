"""Qwen3.5 (text): hybrid of Gated DeltaNet layers and gated full-attention layers, per `layer_types`.

Full attention: q_proj yields query and output gate per head, (1 + weight) q/k RMSNorm, partial RoPE
(`partial_rotary_factor`, 0.25 by default). GDN: in_proj_qkv/z/b/a, causal depthwise conv1d, A_log, dt_bias,
gated RMSNorm norm(x) * silu(z), out_proj. Qwen3-Next (qwen3_next.py) reuses these with a sparse MoE MLP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radixc.models.base import CausalLM, DecoderStack
from radixc.models.config import ModelConfig
from radixc.models.layers import (
    Attention,
    Conv1d,
    GatedMLP,
    GatedRMSNorm,
    MergedLinear,
    RMSNorm,
    RotaryEmbedding,
)
from radixc.models.parallel import RowParallelLinear, VocabParallelEmbedding, current_tensor_parallel
from radixc.models.weights import Shard, set_shard
from radixc.ops.linear_attention import RadixLinearAttention

if TYPE_CHECKING:
    from radixc.forward_batch import ForwardBatch


class GatedDeltaNet(nn.Module):
    """GDN token mixer. One fused projection `in_proj` produces, contiguously, [q | k | v | z | b | a] (heads in
    order), so mixed_qkv is a plain slice in RadixLinearAttention's layout and a decode step reads the four
    checkpoint projections in one GEMM (one launch, not two: b and a are 2 x Hv rows, a launch for ~64 KB).

    Under tensor parallelism the layer holds this rank's key heads and the value heads that read them: the
    input projections, conv channels, A_log and dt_bias keep those heads' rows, out_proj is row-parallel."""

    def __init__(self, config: ModelConfig, layer_id: int, gdn_layer_idx: int):
        super().__init__()
        tp, owner = current_tensor_parallel(), f"GatedDeltaNet(layer_id={layer_id})"
        key_heads, value_heads = config.linear_num_key_heads, config.linear_num_value_heads
        k_start, self.num_k_heads = tp.split(key_heads, f"{owner}'s {key_heads} key heads")
        v_start, self.num_v_heads = tp.split(value_heads, f"{owner}'s {value_heads} value heads")
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.num_k_heads * self.head_k_dim + self.value_dim
        # this rank's rows of the full mixed_qkv [q | k | v], z, and per-value-head tensors (b, a, A_log, dt_bias)
        full_key_dim, key_dim = key_heads * self.head_k_dim, self.num_k_heads * self.head_k_dim
        self.qkv_rows = (
            (k_start * self.head_k_dim, key_dim),
            (full_key_dim + k_start * self.head_k_dim, key_dim),
            (2 * full_key_dim + v_start * self.head_v_dim, self.value_dim),
        )
        self.z_rows = ((v_start * self.head_v_dim, self.value_dim),)
        self.head_rows = ((v_start, self.num_v_heads),)
        self.full_conv_dim = 2 * full_key_dim + value_heads * self.head_v_dim
        self.full_key_heads, self.full_value_heads = key_heads, value_heads
        self.build_input_projections(config.hidden_size)
        kernel = config.linear_conv_kernel_dim
        # weight [conv_dim, 1, kernel] as HF stores it; not called as a module (RadixLinearAttention runs it)
        self.conv1d = Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        if tp.size > 1:
            set_shard(self.conv1d.weight, Shard(0, (self.full_conv_dim, 1, kernel), self.qkv_rows))
            for param in (self.dt_bias, self.A_log):
                set_shard(param, Shard(0, (value_heads,), self.head_rows))
        self.norm = GatedRMSNorm(self.head_v_dim, config.norm_eps)
        self.out_proj = RowParallelLinear(
            value_heads * self.head_v_dim, config.hidden_size, bias=False, owner=owner
        )
        self.attn = RadixLinearAttention(
            layer_id,
            gdn_layer_idx,
            self.num_k_heads,
            self.num_v_heads,
            self.head_k_dim,
            self.head_v_dim,
            self.conv1d.weight,
            self.A_log,
            self.dt_bias,
        )

    def build_input_projections(self, hidden_size: int) -> None:
        """Qwen3.5 stores in_proj_qkv, in_proj_z, in_proj_b, in_proj_a separately: fuse all four by rows."""
        heads = self.full_value_heads
        self.in_proj = MergedLinear(
            hidden_size,
            (
                ("in_proj_qkv", self.full_conv_dim),
                ("in_proj_z", heads * self.head_v_dim),
                ("in_proj_b", heads),
                ("in_proj_a", heads),
            ),
            shards=(self.qkv_rows, self.z_rows, self.head_rows, self.head_rows),
        )

    def project_inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """mixed_qkv `[T, conv_dim]`, z `[T, Hv * Dv]`, b and a `[T, Hv]`: views of the projection's output."""
        sizes = (self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads)
        return self.in_proj(hidden).split(sizes, dim=-1)

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        mixed_qkv, z, b, a = self.project_inputs(hidden)
        core = self.attn(forward_batch, mixed_qkv, a, b)  # [T, Hv * Dv]
        shape = (num_tokens, self.num_v_heads, self.head_v_dim)
        core = self.norm(core.reshape(shape), z.reshape(shape)).reshape(num_tokens, self.value_dim)
        return self.out_proj(core)


class HybridDecoderLayer(nn.Module):
    """h += mixer(norm(h)); h += mlp(norm(h)); the mixer: GDN (`linear_attn`) or attention (`self_attn`)."""

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        linear_attn: GatedDeltaNet | None,
        rotary_emb: RotaryEmbedding,
        mlp: nn.Module,
    ):
        super().__init__()
        self.linear_attn = linear_attn
        self.self_attn = None
        if linear_attn is None:
            self.self_attn = Attention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                layer_id,
                rotary_emb,
                bias=config.attention_bias,
                qk_norm=True,
                zero_centered_norm=True,
                output_gate=True,
                norm_eps=config.norm_eps,
            )
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, zero_centered=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, zero_centered=True)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        if self.linear_attn is not None:
            hidden = hidden + self.linear_attn(normed, forward_batch)
        else:
            hidden = hidden + self.self_attn(positions, normed, forward_batch)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class HybridModel(DecoderStack):
    """Embedding, hybrid decoder layers, final norm: `[T]` ids -> `[T, hidden]`."""

    def __init__(
        self, config: ModelConfig, gdn_cls: type[GatedDeltaNet], make_mlp: Callable[[int], nn.Module]
    ):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding.from_config(config)
        layers, gdn_layer_idx = [], 0
        for layer_id, layer_type in enumerate(config.layer_types):
            linear_attn = None
            if layer_type == "linear_attention":
                linear_attn = gdn_cls(config, layer_id, gdn_layer_idx)
                gdn_layer_idx += 1
            layers.append(
                HybridDecoderLayer(config, layer_id, linear_attn, self.rotary_emb, make_mlp(layer_id))
            )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, zero_centered=True)


class Qwen3_5ForCausalLM(CausalLM):
    """Qwen3.5 text model (HF model_type "qwen3_5_text")."""

    hf_defaults = {
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "head_dim": 256,
        "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
    }
    ignored_checkpoint_patterns = (r"^mtp\.",)
    gdn_cls: type[GatedDeltaNet] = GatedDeltaNet

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = HybridModel(config, self.gdn_cls, self.make_mlp)

    def make_mlp(self, layer_id: int) -> nn.Module:
        """The MLP of decoder layer `layer_id` (Qwen3-Next makes most of them sparse MoE)."""
        return GatedMLP(self.config.hidden_size, self.config.intermediate_size, self.config.hidden_act)

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any], architecture: str) -> ModelConfig:
        """Without `layer_types`, every `full_attention_interval`-th layer (default 4th) is full attention."""
        config = super().config_from_hf(raw, architecture)
        if raw.get("layer_types"):
            return config
        interval = raw.get("full_attention_interval", 4)
        layer_types = tuple(
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(config.num_hidden_layers)
        )
        return dataclasses.replace(config, layer_types=layer_types)


class Qwen3_5ForConditionalGeneration(Qwen3_5ForCausalLM):
    """The text model of a Qwen3.5 vision-language checkpoint (vision tower and MTP head not loaded)."""

    ignored_checkpoint_patterns = (r"^mtp\.", r"^model\.visual\.")
    checkpoint_prefix_renames = (("model.language_model.", "model."),)

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any], architecture: str) -> ModelConfig:
        """Parse `text_config`; the top-level tie_word_embeddings / eos ids / dtype win over its own."""
        text = dict(raw.get("text_config") or {})
        text.update(
            {k: raw[k] for k in ("tie_word_embeddings", "eos_token_id", "dtype", "torch_dtype") if k in raw}
        )
        return super().config_from_hf(text, architecture)
