"""Shared harness for the engine tests (the `harness` fixture): tiny models with varied outputs, random prompts,
a cache-free greedy reference and a pool-emptiness check."""

from __future__ import annotations

import types

import pytest
import torch

from radixc.engine.backends import HybridAttnBackend, NativeBackend
from radixc.engine.batch_builder import BatchBuilder
from radixc.engine.memory_pool import GDNPool, KVPool, ReqToTokenPool
from radixc.models.presets import build_preset, init_random_weights


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A preset with weights large enough (std 0.2) that greedy outputs vary instead of repeating a token."""
    model = build_preset(name)
    init_random_weights(model, seed, std=0.2)
    return model


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    return tiny_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_qwen3_5() -> torch.nn.Module:
    return tiny_model("tiny-qwen3.5")


def random_prompts(count: int, low: int, high: int, seed: int, vocab: int = 384) -> list[list[int]]:
    """count prompts of random lengths in [low, high] of random ids (2.. so that EOS id 1 never appears)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, stop=()) -> list[int]:
    """Greedy tokens of one request, every step recomputing the whole sequence in fresh pools (no cache reuse,
    no batching, no scheduler)."""
    spec = model.kv_cache_spec()
    backend = NativeBackend()
    gdn = None
    if spec.gdn_layer_ids:
        backend = HybridAttnBackend(NativeBackend(), NativeBackend(), spec.full_attention_layer_ids)
        gdn = GDNPool(
            2,
            spec.num_gdn_layers,
            spec.conv_dim,
            spec.conv_kernel_size,
            spec.num_v_heads,
            spec.head_k_dim,
            spec.head_v_dim,
            torch.float32,
        )
    length = len(prompt) + max_new_tokens
    kv = KVPool(
        length + 1,
        1,
        spec.num_layers,
        spec.num_kv_heads,
        spec.head_dim,
        torch.float32,
        v_head_dim=spec.v_head_dim,
        layer_ids=spec.full_attention_layer_ids,
    )
    builder = BatchBuilder(ReqToTokenPool(2, length), kv, backend, gdn_pool=gdn)
    tokens, out = list(prompt), []
    for _ in range(max_new_tokens):
        request = builder.new_request()
        batch = builder.extend([request], [tokens])
        token = int(model(batch.input_ids, batch.positions, batch)[-1].argmax())
        builder.release(request)
        out.append(token)
        tokens.append(token)
        if token in stop:
            break
    return out


def assert_pools_empty(llm, cached_pages: int = 0) -> None:
    """No request holds memory: every request row, GDN slot and KV page is free but the prefix cache's."""
    runner = llm.runner
    assert runner.req_to_token_pool.num_free == runner.req_to_token_pool.size - 1
    if runner.gdn_pool is not None:
        assert runner.gdn_pool.num_free == runner.gdn_pool.num_slots - 1
    if runner.kv_pool is not None:
        assert runner.kv_pool.num_free_pages + cached_pages == runner.kv_pool.capacity_pages


@pytest.fixture(params=[False, True], ids=["in_order", "overlapped"])
def scheduling(request, monkeypatch) -> bool:
    """Run a test with LLM's overlapped scheduling off, then on (its default is on only for CUDA)."""
    from radixc.engine.llm import LLM

    init = LLM.__init__

    def init_with_scheduling(self, *args, overlap_scheduling=request.param, **kwargs):
        init(self, *args, overlap_scheduling=overlap_scheduling, **kwargs)

    monkeypatch.setattr(LLM, "__init__", init_with_scheduling)
    return request.param


@pytest.fixture
def harness() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        tiny_model=tiny_model,
        random_prompts=random_prompts,
        reference_greedy=reference_greedy,
        assert_pools_empty=assert_pools_empty,
    )
