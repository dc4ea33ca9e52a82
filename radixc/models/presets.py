"""Named model shapes (config.json-shaped dicts) built with deterministic random weights.

Full-size shapes (`llama-1b`, `gemma2-2b`, ...) serve benchmarks without downloads; `tiny-*` ones run fast on
CPU in tests. The engine resolves a model name here; `load_model` only takes checkpoint directories.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from radixc.models.layers import GatedRMSNorm, RMSNorm
from radixc.models.qwen3_5 import GatedDeltaNet
from radixc.models.registry import build_model, model_config
from radixc.models.weights import param_shard

_TINY = {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 512}
_LLAMA_3_2_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-1b": {  # Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": _LLAMA_3_2_ROPE,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "dtype": "bfloat16",
    },
    "qwen3.5-0.8b": {  # Qwen3.5-0.8B-like text model: 24 layers, every 4th full attention
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": 248320,
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 24,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 16,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 4,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "tie_word_embeddings": True,
        "eos_token_id": 248044,
        "dtype": "bfloat16",
    },
    "gemma2-2b": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 107],
        "pad_token_id": 0,
        "dtype": "bfloat16",
    },
    "qwen3-next-tiny": {  # a small Qwen3-Next (every 4th layer full attention, 16 experts top-4)
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "linear_num_key_heads": 4,
        "linear_num_value_heads": 8,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 512,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "eos_token_id": 2,
        "dtype": "bfloat16",
    },
    "bert-mini": {  # BERT L-4 H-256 A-4
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "dtype": "float32",
    },
    "tiny-llama": {  # GQA 4:2
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_TINY,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {**_LLAMA_3_2_ROPE, "original_max_position_embeddings": 64},
        "tie_word_embeddings": True,
        "eos_token_id": 1,
        "dtype": "float32",
    },
    "tiny-qwen3": {  # MQA, head_dim decoupled from hidden / heads
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_TINY,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "eos_token_id": 1,
        "dtype": "float32",
    },
    "tiny-gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        **_TINY,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "eos_token_id": 1,
        "dtype": "float32",
    },
    "tiny-qwen3.5": {  # two GDN layers, then full attention, then GDN
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        **_TINY,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "eos_token_id": 1,
        "dtype": "float32",
    },
    "tiny-qwen3-next": {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        **_TINY,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "eos_token_id": 1,
        "dtype": "float32",
    },
    "tiny-bert": {
        "architectures": ["BertModel"],
        "model_type": "bert",
        **_TINY,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "type_vocab_size": 2,
        "dtype": "float32",
    },
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the preset's config.json dict (save it next to a checkpoint to make a loadable directory)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r} (known: {list_presets()})")
    return copy.deepcopy(PRESETS[name])


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer for a preset's random model, which ships none: token i is the word "w{i}", words split on
    whitespace and decode joined by spaces."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def build_preset(
    name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None, seed: int = 0
) -> nn.Module:
    """The preset's model with deterministic random weights (same seed and device -> same weights)."""
    model_cls, config = model_config(preset_config(name))
    model = build_model(model_cls, config, dtype or config.dtype or torch.float32, device or "cpu")
    init_random_weights(model, seed)
    return model


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter: N(0, std) weights, zero biases, identity norms, GDN A in [1, 16], dt_bias 1.

    A sharded parameter (tensor parallelism) draws the full weight and keeps its shard, so every rank count
    yields the same model."""
    generator = None
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if generator is None:
                generator = torch.Generator(device=param.device).manual_seed(seed)
            shard = param_shard(param)
            full = param if shard is None else param.new_empty(shard.full_shape)
            if isinstance(module, RMSNorm):
                full.fill_(0.0 if module.zero_centered else 1.0)
            elif isinstance(module, (GatedRMSNorm, nn.LayerNorm)):
                full.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(module, GatedDeltaNet) and name == "A_log":
                full.uniform_(math.log(1.0), math.log(16.0), generator=generator)
            elif isinstance(module, GatedDeltaNet) and name == "dt_bias":
                full.fill_(1.0)
            elif name == "bias":
                full.zero_()
            else:
                full.normal_(0.0, std, generator=generator)
            if shard is not None:
                param.zero_()
                param[shard.region()].copy_(shard.take(full))
