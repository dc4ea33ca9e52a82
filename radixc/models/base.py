"""CausalLM: what every decoder family shares (config parsing, lm_head and logits, cache spec, eos ids)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from radixc.cache_spec import KVCacheSpec
from radixc.models.config import ModelConfig, parse_config
from radixc.models.layers import compute_logits, logits_rows
from radixc.models.parallel import VocabParallelEmbedding, current_tensor_parallel, split_heads

if TYPE_CHECKING:
    from radixc.forward_batch import ForwardBatch


def own_compile_cache(module: nn.Module, *methods: str) -> None:
    """Give `module` private copies of its methods' code objects.

    Dynamo keeps guards and its recompile budget per code object; with its own copy, each model instance compiles
    its own graphs, so many models in one process neither share guards nor run out of one shared cache.
    """
    for name in methods:
        function = getattr(type(module), name)
        copy = types.FunctionType(
            function.__code__.replace(),
            function.__globals__,
            function.__name__,
            function.__defaults__,
            function.__closure__,
        )
        copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = (
            function.__kwdefaults__,
            function.__qualname__,
            function.__doc__,
        )
        copy.__module__ = function.__module__
        setattr(module, name, types.MethodType(copy, module))


class DecoderStack(nn.Module):
    """Embedding, decoder layers `(positions, hidden, forward_batch) -> hidden`, final norm: `[T]` ids ->
    `[T, hidden]`. Subclasses build `embed_tokens`, `layers` and `norm`, and may override `embed`."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, forward_batch)
        return self.norm(hidden)


class CausalLM(nn.Module):
    """A decoder-only LM: `self.model(input_ids, positions, forward_batch) -> [T, hidden]` then the LM head.

    Subclasses build `self.model` (with `embed_tokens`) and set `hf_defaults` (config.json values Hugging Face
    assumes when a key is absent).
    """

    hf_defaults: ClassVar[Mapping[str, Any]] = {}
    # regexes of checkpoint tensors this family never loads (e.g. a multi-token-prediction head)
    ignored_checkpoint_patterns: ClassVar[tuple[str, ...]] = ()
    # (old, new) checkpoint name prefixes, e.g. a multimodal checkpoint's text tower
    checkpoint_prefix_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    final_logit_softcap: float | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tensor_parallel = current_tensor_parallel()
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        )
        own_compile_cache(self, "forward")

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any], architecture: str) -> ModelConfig:
        """Parse a config.json dict with this family's defaults."""
        return parse_config(raw, architecture, cls.hf_defaults)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        """Float32 logits `[R, vocab]` of the rows `forward_batch.logits_indices` (all `T` rows if None)."""
        hidden = self.model(input_ids, positions, forward_batch)
        head = self.lm_head_module
        logits = compute_logits(logits_rows(hidden, forward_batch), head.weight, self.final_logit_softcap)
        return head.gather_logits(logits)

    @property
    def lm_head_module(self) -> VocabParallelEmbedding:
        """The LM head: its own (untied) or the input embedding (tied); split by vocabulary rows."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head_module.weight

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids

    def checkpoint_ignores(self) -> tuple[str, ...]:
        """Regexes of checkpoint tensors to skip: the family's, a tied lm_head, stale rotary buffers."""
        tied = (r"^lm_head\.weight$",) if self.lm_head is None else ()
        return (*self.ignored_checkpoint_patterns, *tied, r"\.rotary_emb\.inv_freq$")

    def kv_cache_spec(self) -> KVCacheSpec:
        """KV pool geometry (every non-GDN layer is KV-cached, this rank's KV heads) and, for hybrids, the GDN
        state geometry."""
        cfg = self.config
        heads = split_heads(
            cfg.num_attention_heads, cfg.num_key_value_heads, self.tensor_parallel, type(self).__name__
        )
        gdn_ids = tuple(i for i, t in enumerate(cfg.layer_types) if t == "linear_attention")
        hybrid = {}
        if gdn_ids:
            size = self.tensor_parallel.size  # each rank holds its share of the GDN heads (divisible: built)
            num_k_heads, num_v_heads = cfg.linear_num_key_heads // size, cfg.linear_num_value_heads // size
            hybrid = dict(
                gdn_layer_ids=gdn_ids,
                conv_dim=2 * num_k_heads * cfg.linear_key_head_dim + num_v_heads * cfg.linear_value_head_dim,
                conv_kernel_size=cfg.linear_conv_kernel_dim,
                num_k_heads=num_k_heads,
                num_v_heads=num_v_heads,
                head_k_dim=cfg.linear_key_head_dim,
                head_v_dim=cfg.linear_value_head_dim,
            )
        sliding_ids = tuple(i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention")
        return KVCacheSpec(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=heads.num_kv_heads,
            head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            full_attention_layer_ids=tuple(i for i in range(cfg.num_hidden_layers) if i not in gdn_ids),
            sliding_window=cfg.sliding_window if sliding_ids else None,
            sliding_window_layer_ids=sliding_ids,
            **hybrid,
        )
