"""LLM from a Hugging Face checkpoint directory with a tokenizer.json: string prompts in, text out, and the
greedy tokens transformers generates."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.models.presets import preset_config


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i is the word "w{i}"; words split on whitespace."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny Llama saved by transformers, with a word-level tokenizer.json."""
    path = tmp_path_factory.mktemp("tiny_llama")
    config = preset_config("tiny-llama")
    hf = HFLlama._from_config(LlamaConfig(**config), attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    hf.save_pretrained(path)
    word_tokenizer(config["vocab_size"]).save(str(path / "tokenizer.json"))
    return path, hf


@torch.inference_mode()
def hf_greedy(hf: HFLlama, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_string_prompts_give_text_and_transformers_greedy_tokens(checkpoint):
    path, hf = checkpoint
    llm = LLM(str(path), compile=False, page_size=4, progress=False)
    prompts = ["w5 w17 w300 w42", "w9 w9 w120"]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        ids = [int(w[1:]) for w in prompt.split()]
        assert out.prompt_token_ids == ids
        assert out.token_ids == hf_greedy(hf, ids, 6)
        assert out.text == " ".join(f"w{t}" for t in out.token_ids)
    no_tokenizer = LLM("tiny-llama", compile=False, progress=False)
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        no_tokenizer.generate(["w1 w2"])
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        LLM(str(path / "missing"), compile=False)
