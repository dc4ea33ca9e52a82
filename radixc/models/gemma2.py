"""Gemma 2: sliding-window layers alternating with global ones, attention and final logit soft-caps,
four (1 + weight) RMSNorms per layer, embeddings scaled by sqrt(hidden) in the embedding dtype, GeLU-tanh
MLP."""

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


class Gemma2DecoderLayer(nn.Module):
    """h += post_attn_norm(attn(norm(h))); h += post_ffw_norm(mlp(pre_ffw_norm(h)))."""

    def __init__(self, config: ModelConfig, layer_id: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_id,
            rotary_emb,
            scaling=config.query_pre_attn_scalar**-0.5,
            bias=config.attention_bias,
            logit_cap=config.attn_logit_softcapping or 0.0,
            sliding_window=config.sliding_window_of(layer_id),
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        norm = lambda: RMSNorm(config.hidden_size, config.norm_eps, zero_centered=True)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), forward_batch)
        hidden = hidden + self.post_attention_layernorm(attn)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma2Model(DecoderStack):
    """Scaled embedding, decoder layers, final norm: `[T]` ids -> `[T, hidden]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.rotary_emb = RotaryEmbedding.from_config(config)
        self.layers = nn.ModuleList(
            Gemma2DecoderLayer(config, i, self.rotary_emb) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, zero_centered=True)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # the scale is rounded to the embedding dtype first (sqrt(2304) becomes 48.0 in bfloat16), as in HF
        return hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2 (2B / 9B / 27B shapes)."""

    hf_defaults = {
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = Gemma2Model(config)
        self.final_logit_softcap = config.final_logit_softcapping

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any], architecture: str) -> ModelConfig:
        """Without `layer_types`, even layers (0, 2, ...) slide and odd ones are global (as HF)."""
        config = super().config_from_hf(raw, architecture)
        if raw.get("layer_types"):
            return config
        layer_types = tuple(
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)
        )
        return dataclasses.replace(config, layer_types=layer_types)
