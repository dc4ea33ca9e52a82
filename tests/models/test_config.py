"""config.json parsing: rope in both HF formats, family defaults and layer-type rules, explicit nulls."""

from __future__ import annotations

import pytest
import torch

from radixc.models import CheckpointError, preset_config
from radixc.models.config import parse_config, parse_dtype
from radixc.models.layers import rope_inv_freq
from radixc.models.registry import model_config

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 100,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def test_old_rope_scaling_and_new_rope_parameters_parse_alike():
    old = {
        **LLAMA,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    new = {**LLAMA, "rope_parameters": {**old["rope_scaling"], "rope_theta": 500000.0}}
    assert model_config(old)[1].rope == model_config(new)[1].rope
    rope = model_config(old)[1].rope
    assert (rope.rope_type, rope.theta, rope.factor) == ("llama3", 500000.0, 32.0)


def test_llama3_rope_keeps_high_and_divides_low_frequencies():
    rope = model_config(preset_config("llama-1b"))[1].rope
    scaled, plain = rope_inv_freq(rope, 64), 1.0 / 500000.0 ** (torch.arange(0, 64, 2).float() / 64)
    assert torch.equal(scaled[:4], plain[:4])
    torch.testing.assert_close(scaled[-4:], plain[-4:] / 32.0)


def test_family_defaults_and_derived_fields():
    _, config = model_config(LLAMA)
    assert (config.num_key_value_heads, config.head_dim, config.tie_word_embeddings) == (4, 16, False)
    assert config.layer_types == ("full_attention",) * 2 and config.eos_token_ids == (2,)


def test_gemma2_alternates_sliding_layers_and_honours_null_soft_caps():
    raw = {
        **LLAMA,
        "architectures": ["Gemma2ForCausalLM"],
        "num_hidden_layers": 4,
        "final_logit_softcapping": None,
    }
    _, config = model_config(raw)
    assert config.layer_types[:2] == ("sliding_attention", "full_attention")
    assert config.sliding_window_of(0) == 4096 and config.sliding_window_of(1) == -1
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping == 50.0


def test_qwen3_windows_apply_only_with_use_sliding_window():
    raw = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "sliding_window": 16, "max_window_layers": 1}
    assert model_config(raw)[1].sliding_window_of(1) == -1
    assert model_config({**raw, "use_sliding_window": True})[1].layer_types == (
        "full_attention",
        "sliding_attention",
    )


def test_qwen3_next_defaults_to_every_fourth_layer_full_and_quarter_rotary():
    raw = {**LLAMA, "architectures": ["Qwen3NextForCausalLM"], "num_hidden_layers": 8, "head_dim": 64}
    _, config = model_config(raw)
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [3, 7]
    assert config.rotary_dim == 16


def test_bad_configs_are_named():
    with pytest.raises(CheckpointError, match="missing required field 'hidden_size'"):
        parse_config({"num_attention_heads": 4, "num_hidden_layers": 1}, "LlamaForCausalLM")
    with pytest.raises(CheckpointError, match="layer_types has 1 entries for 2 layers"):
        model_config({**LLAMA, "layer_types": ["full_attention"]})
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        parse_dtype("int8")
    assert parse_dtype("torch.bfloat16") is torch.bfloat16
