"""Our own small view of a Hugging Face config.json, and the cache layout a model asks the engine for."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from radixc.models.weights import CheckpointError

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, or the older `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields of config.json that radixc models read; `raw` keeps the whole file for anything else."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = RopeConfig()
    # one of "full_attention", "sliding_attention", "linear_attention" per layer
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    # Gemma2
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gated DeltaNet (Qwen3.5, Qwen3-Next)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    # sparse MoE (Qwen3-Next)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # BERT
    type_vocab_size: int = 0
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotate (`head_dim * partial_rotary_factor`, as HF truncates it)."""
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def sliding_window_of(self, layer_id: int) -> int:
        """RadixAttention's sliding_window_size for a layer: the window on sliding layers, else -1."""
        if self.layer_types[layer_id] == "sliding_attention" and self.sliding_window:
            return int(self.sliding_window)
        return -1


# the names users and command lines give (config.json's torch_dtype also takes "float", "half", "torch.<name>")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a config string ("bfloat16", "torch.float16") or a dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {value!r} (supported: {sorted(_DTYPES)})")
    return _DTYPES[name]


def parse_rope(raw: Mapping[str, Any]) -> RopeConfig:
    """Read HF 5 `rope_parameters`, falling back to the older top-level `rope_theta` and `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        original = raw.get("max_position_embeddings")
    return RopeConfig(
        theta=float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        partial_rotary_factor=float(
            params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        ),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
    )


def _eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def parse_config(
    raw: Mapping[str, Any], architecture: str, defaults: Mapping[str, Any] | None = None
) -> ModelConfig:
    """Build a ModelConfig from a config.json dict; `defaults` are the family's values for absent keys."""
    # an explicit null in config.json overrides the family default (e.g. no final logit soft-cap)
    merged = {**(defaults or {}), **raw}

    def need(key: str) -> Any:
        if merged.get(key) is None:
            raise CheckpointError(f"config.json for {architecture}: missing required field {key!r}")
        return merged[key]

    hidden_size = int(need("hidden_size"))
    num_heads = int(need("num_attention_heads"))
    num_layers = int(need("num_hidden_layers"))
    if hidden_size % num_heads and not merged.get("head_dim"):
        raise CheckpointError(
            f"config.json for {architecture}: hidden_size {hidden_size} not divisible by {num_heads} heads"
        )
    layer_types = tuple(merged.get("layer_types") or ("full_attention",) * num_layers)
    if len(layer_types) != num_layers:
        raise CheckpointError(
            f"config.json for {architecture}: layer_types has {len(layer_types)} entries for "
            f"{num_layers} layers"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    passthrough = {k: merged[k] for k in fields if merged.get(k) is not None and k not in _DERIVED_FIELDS}
    return ModelConfig(
        **passthrough,
        architecture=architecture,
        model_type=str(merged.get("model_type", "")),
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_hidden_layers=num_layers,
        num_key_value_heads=int(merged.get("num_key_value_heads") or num_heads),
        head_dim=int(merged.get("head_dim") or hidden_size // num_heads),
        hidden_act=str(merged.get("hidden_activation") or merged.get("hidden_act") or "silu"),
        norm_eps=float(merged.get("rms_norm_eps") or merged.get("layer_norm_eps") or 1e-6),
        rope=parse_rope(merged),
        layer_types=layer_types,
        mlp_only_layers=tuple(merged.get("mlp_only_layers") or ()),
        eos_token_ids=_eos_ids(merged.get("eos_token_id")),
        dtype=parse_dtype(merged.get("dtype") or merged.get("torch_dtype")),
        raw=dict(raw),
    )


# ModelConfig fields that parse_config computes rather than copies from config.json
_DERIVED_FIELDS = frozenset(
    {
        "architecture",
        "model_type",
        "hidden_size",
        "num_attention_heads",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "norm_eps",
        "rope",
        "layer_types",
        "mlp_only_layers",
        "eos_token_ids",
        "dtype",
        "raw",
    }
)
