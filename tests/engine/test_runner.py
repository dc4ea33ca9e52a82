"""ModelRunner: pool geometry read off a plain module's radix layers, such a module served by LLM, and
encoder models' pooled embeddings matching a per-prompt reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radixc.engine.backends import NativeBackend
from radixc.engine.batch_builder import BatchBuilder
from radixc.engine.llm import LLM
from radixc.engine.memory_pool import ReqToTokenPool
from radixc.engine.request import SamplingParams
from radixc.engine.runner import model_cache_spec
from radixc.ops import RadixAttention, RadixLinearAttention, rotary_embedding

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 96, 32, 4, 2, 8
HK, HV, DK, DV, KERNEL = 2, 4, 8, 8, 4
CONV_DIM = 2 * HK * DK + HV * DV


class GDNThenAttention(nn.Module):
    """A user's module with no kv_cache_spec(): a GDN layer (layer 0), then rotary attention (layer 1)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.in_proj = nn.Linear(HIDDEN, CONV_DIM + 2 * HV)
        self.conv_weight = nn.Parameter(torch.randn(CONV_DIM, 1, KERNEL, generator=gen) * 0.3)
        self.A_log = nn.Parameter(torch.rand(HV, generator=gen))
        self.dt_bias = nn.Parameter(torch.randn(HV, generator=gen) * 0.3)
        self.gdn = RadixLinearAttention(0, 0, HK, HV, DK, DV, self.conv_weight, self.A_log, self.dt_bias)
        self.gdn_out = nn.Linear(HV * DV, HIDDEN)
        self.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.attn = RadixAttention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, layer_id=1)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        freqs = torch.outer(torch.arange(256).float(), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1))
        self.out = nn.Linear(HEADS * HEAD_DIM, VOCAB)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name not in ("conv_weight", "A_log", "dt_bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, input_ids, positions, forward_batch):
        x = self.embed(input_ids)
        mixed_qkv, a, b = self.in_proj(x).split([CONV_DIM, HV, HV], dim=-1)
        x = x + self.gdn_out(self.gdn(forward_batch, mixed_qkv, a, b))
        q, k, v = self.qkv(x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q, k = rotary_embedding(positions, q, k, self.cos_sin, HEAD_DIM)
        out = self.out(self.attn(q, k, v, forward_batch))
        if forward_batch.logits_indices is not None:
            out = out[forward_batch.logits_indices]
        return out


def test_cache_spec_is_read_off_the_radix_layers_of_a_plain_module():
    spec = model_cache_spec(GDNThenAttention())
    assert (spec.num_layers, spec.full_attention_layer_ids, spec.gdn_layer_ids) == (2, (1,), (0,))
    assert (spec.num_kv_heads, spec.head_dim, spec.v_head_dim) == (KV_HEADS, HEAD_DIM, HEAD_DIM)
    gdn = (spec.conv_dim, spec.conv_kernel_size, spec.num_v_heads, spec.head_k_dim, spec.head_v_dim)
    assert gdn == (CONV_DIM, KERNEL, HV, DK, DV)
    with pytest.raises(ValueError, match="neither kv_cache_spec"):
        model_cache_spec(nn.Linear(2, 2))


def test_a_plain_hybrid_module_is_served_with_batched_tokens_equal_to_alone(harness):
    model = GDNThenAttention()
    prompts = harness.random_prompts(10, 1, 30, seed=20, vocab=VOCAB)
    params = SamplingParams(max_new_tokens=10)
    llm = LLM(model, compile=False, page_size=4, max_batch_size=4, max_tokens_per_step=24, progress=False)
    batched = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in batched}) > 5
    harness.assert_pools_empty(llm, cached_pages=llm.prefix_cache_stats().cached_pages)


@torch.inference_mode()
def reference_mean_pool(model: nn.Module, prompt: list[int]) -> torch.Tensor:
    """Float64 mean of one prompt's last hidden states, run alone."""
    device = next(model.parameters()).device
    builder = BatchBuilder(ReqToTokenPool(2, len(prompt), device), None, NativeBackend(), device=device)
    request = builder.new_request()
    batch = builder.extend([request], [prompt], all_logits=True)
    return model(batch.input_ids, batch.positions, batch).double().mean(0)


def test_encode_batches_prompts_into_per_prompt_mean_pooled_embeddings(harness):
    llm = LLM("tiny-bert", compile=False, max_tokens_per_step=40, max_batch_size=3, progress=False)
    prompts = harness.random_prompts(7, 1, 30, seed=21)
    expected = torch.stack([reference_mean_pool(llm.model, p) for p in prompts])
    torch.testing.assert_close(llm.encode(prompts).double(), expected, atol=1e-5, rtol=1e-5)
    normalized = llm.encode(prompts, normalize=True).double()
    torch.testing.assert_close(
        normalized, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5
    )
    harness.assert_pools_empty(llm)
    with pytest.raises(ValueError, match="encoder-only model: use encode"):
        llm.generate([[3, 4]])
    with pytest.raises(ValueError, match=r"prompt 1: has 600 tokens, not in \[1, max_context_len=512\]"):
        llm.encode([[3], [4] * 600])
