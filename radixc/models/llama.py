"""Llama and Qwen3 (Llama plus per-head q/k RMSNorm before RoPE): pre-norm decoder, gated SiLU MLP."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radixc.models.base import CausalLM, DecoderStack
from radixc.models.config import ModelConfig
from radixc.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from radixc.models.parallel import VocabParallelEmbedding

if TYPE_CHECKING:
    from radixc.forward_batch import ForwardBatch


class LlamaDecoderLayer(nn.Module):
    """h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_id: int, rotary_emb: RotaryEmbedding, qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_id,
            rotary_emb,
            bias=config.attention_bias,
            qk_norm=qk_norm,
            sliding_window=config.sliding_window_of(layer_id),
            norm_eps=config.norm_eps,
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), forward_batch)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(DecoderStack):
    """Embedding, decoder layers sharing one rotary table, final norm: `[T]` ids -> `[T, hidden]`."""

    def __init__(self, config: ModelConfig, qk_norm: bool = False):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding.from_config(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, self.rotary_emb, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama 2/3 (GQA or MQA, rope types default / linear / llama3)."""

    hf_defaults = {
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
    }
    qk_norm = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = LlamaModel(config, qk_norm=self.qk_norm)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense: Llama with RMSNorm on each q and k head before RoPE, explicit head_dim."""

    hf_defaults = {
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "head_dim": 128,
    }
    qk_norm = True

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any], architecture: str) -> ModelConfig:
        """Windows apply only with `use_sliding_window`; without `layer_types`, the layers from
        `max_window_layers` on slide (as HF)."""
        config = super().config_from_hf(raw, architecture)
        if not raw.get("use_sliding_window"):
            return dataclasses.replace(config, sliding_window=None)
        if raw.get("layer_types"):
            return config
        first_sliding = raw.get("max_window_layers", 28)
        layer_types = tuple(
            "sliding_attention" if i >= first_sliding else "full_attention"
            for i in range(config.num_hidden_layers)
        )
        return dataclasses.replace(config, layer_types=layer_types)
