"""BERT encoder (ENCODER_ONLY attention: bidirectional within each request, no KV cache) and mean pooling.

Module names mirror Hugging Face's BertModel so checkpoint tensors map by name (query/key/value fused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from radixc.cache_spec import KVCacheSpec
from radixc.models.base import own_compile_cache
from radixc.models.config import ModelConfig, parse_config
from radixc.models.layers import Embedding, Linear, MergedLinear, activation
from radixc.ops.attention import AttentionType, RadixAttention

if TYPE_CHECKING:
    from radixc.forward_batch import ForwardBatch


class BertEmbeddings(nn.Module):
    """word + absolute position + token type (segment 0) embeddings, then LayerNorm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # every token is in segment 0: the batch carries no token type ids
        hidden = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(hidden + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    """Fused query/key/value projection and bidirectional attention within each request."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        self.qkv = MergedLinear(hidden, (("query", hidden), ("key", hidden), ("value", hidden)), bias=True)
        self.attn = RadixAttention(
            heads, head_dim, head_dim**-0.5, heads, layer_id, attn_type=AttentionType.ENCODER_ONLY
        )

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        return self.attn(q, k, v, forward_batch, save_kv_cache=False)


class BertResidualOutput(nn.Module):
    """LayerNorm(residual + dense(x)): HF's BertSelfOutput and BertOutput (post-LN)."""

    def __init__(self, in_features: int, hidden_size: int, eps: float):
        super().__init__()
        self.dense = Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.self = BertSelfAttention(config, layer_id)  # HF's module name
        self.output = BertResidualOutput(config.hidden_size, config.hidden_size, config.norm_eps)

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        return self.output(self.self(hidden, forward_batch), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """h = LN(h + attn(h)); h = LN(h + dense(act(dense(h))))."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.attention = BertAttention(config, layer_id)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config.hidden_size, config.norm_eps)

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        hidden = self.attention(hidden, forward_batch)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """BERT encoder: `forward` gives token states `[T, hidden]`, `encode` mean-pools them per request."""

    hf_defaults = {
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "max_position_embeddings": 512,
    }
    # checkpoints of BertFor* heads nest the encoder under "bert."
    checkpoint_prefix_renames = (("bert.", ""),)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        own_compile_cache(self, "forward", "encode")

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any], architecture: str) -> ModelConfig:
        return parse_config(raw, architecture, cls.hf_defaults)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        """Last hidden states `[T, hidden]` of the packed requests."""
        hidden = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            hidden = layer(hidden, forward_batch)
        return hidden

    def encode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Mean of each request's token states `[B, hidden]` (sentence-transformers pooling); L2-normalised
        when `normalize`."""
        hidden = self.forward(input_ids, positions, forward_batch)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # request of each token row: the last request starting at or before it
        request = torch.searchsorted(forward_batch.extend_start_loc, rows, right=True) - 1
        sums = hidden.new_zeros(forward_batch.batch_size, hidden.shape[1]).index_add_(0, request, hidden)
        pooled = sums / forward_batch.extend_seq_lens.unsqueeze(1).to(hidden.dtype)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return ()

    def checkpoint_ignores(self) -> tuple[str, ...]:
        """Tensors mean pooling does not use: pooler, MLM / NSP heads, and the position_ids buffer."""
        return (r"^pooler\.", r"^cls\.", r"^embeddings\.position_ids$", r"^embeddings\.token_type_ids$")

    def kv_cache_spec(self) -> KVCacheSpec:
        """No KV cache: encoder-only attention reads only the current step's tokens."""
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        return KVCacheSpec(cfg.num_hidden_layers, cfg.num_attention_heads, head_dim, head_dim, ())
