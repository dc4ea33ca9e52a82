"""load_model on Hugging Face-format directories: sharded or not, dtype handling, tied embeddings, and a clear
CheckpointError naming the problem for every malformed checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from radixc.models import CheckpointError, load_model


def make_checkpoint(path, tie: bool = False, **save_kwargs) -> HFLlama:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    hf = HFLlama(config).eval()
    hf.save_pretrained(path, **save_kwargs)
    return hf


def hf_state(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def rewrite(path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")


def test_weights_land_in_fused_parameters(tmp_path):
    hf = make_checkpoint(tmp_path)
    model = load_model(tmp_path)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    hf_attn, hf_mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    expected_qkv = torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert model.eos_token_ids == (2,)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    make_checkpoint(tmp_path / "one")
    make_checkpoint(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    single, sharded = load_model(tmp_path / "one"), load_model(tmp_path / "sharded")
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


def test_dtype_comes_from_config_unless_given(tmp_path):
    make_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert next(load_model(tmp_path).parameters()).dtype == torch.bfloat16
    model = load_model(tmp_path, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    # the rotary table stays float32 whatever the model dtype
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32


def test_tied_embeddings_share_the_embedding_and_ignore_a_stored_lm_head(tmp_path):
    hf = make_checkpoint(tmp_path, tie=True)
    model = load_model(tmp_path)
    assert model.lm_head is None and torch.equal(model.lm_head_weight, hf.model.embed_tokens.weight)
    tensors = hf_state(tmp_path)
    tensors["lm_head.weight"] = torch.randn(128, 32)  # some tied checkpoints store it anyway
    rewrite(tmp_path, tensors)
    assert torch.equal(load_model(tmp_path).lm_head_weight, hf.model.embed_tokens.weight)


def test_generation_config_eos_ids_are_merged(tmp_path):
    make_checkpoint(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert load_model(tmp_path).eos_token_ids == (2, 7)


def test_unknown_architecture_is_named(tmp_path):
    make_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown architecture.*MambaForCausalLM"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    make_checkpoint(tmp_path)
    tensors = hf_state(tmp_path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    rewrite(tmp_path, tensors)
    with pytest.raises(
        CheckpointError, match=r"missing tensors.*model\.layers\.1\.self_attn\.k_proj\.weight"
    ):
        load_model(tmp_path)


def test_wrongly_shaped_tensor_is_named_with_both_shapes(tmp_path):
    make_checkpoint(tmp_path)
    tensors = hf_state(tmp_path)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(40, 32)
    rewrite(tmp_path, tensors)
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\[40, 32\].*\[48, 32\]"
    ):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    make_checkpoint(tmp_path)
    tensors = hf_state(tmp_path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.randn(8)
    rewrite(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*q_norm\.weight"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupted_shard_is_named(tmp_path, damage):
    make_checkpoint(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*corrupted"):
        load_model(tmp_path)


def test_shard_lacking_a_tensor_its_index_lists_is_named(tmp_path):
    make_checkpoint(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    tensors = load_file(tmp_path / shard)
    del tensors[name]
    save_file(tensors, tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"{shard}.*lacks.*{name}"):
        load_model(tmp_path)


def test_missing_shard_and_pickle_only_checkpoints_are_refused(tmp_path):
    make_checkpoint(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is missing"):
        load_model(tmp_path / "sharded")
    make_checkpoint(tmp_path / "pickle")
    (tmp_path / "pickle" / "model.safetensors").rename(tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(tmp_path / "pickle")
