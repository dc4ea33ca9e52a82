"""EngineConfig: KV pages from the memory budget, context length fitted to the model and the pool, and
explicit limits that cannot be met rejected with the reason."""

from __future__ import annotations

import pytest
import torch

from radixc.cache_spec import KVCacheSpec
from radixc.engine.config import COMPILE_RESERVE, DEVICE_DEFAULTS, EngineConfig

CPU = torch.device("cpu")
SPEC = KVCacheSpec(4, 2, 16, 8, (0, 1, 3))  # layer 2 is not KV-cached
PAGE_BYTES = 16 * 3 * 2 * (16 + 8) * 2  # page_size * cached layers * kv heads * (k + v dim) * bf16


def test_pages_come_from_the_memory_budget_and_context_fits_model_and_pool():
    config = EngineConfig.resolve(CPU, SPEC, torch.bfloat16, 100_000, kv_memory_bytes=40 * PAGE_BYTES + 5)
    assert config.num_kv_pages == 41  # 40 usable and the padding page
    assert config.max_context_len == 40 * 16  # the pool, below the CPU default and the model's limit
    small_model = EngineConfig.resolve(CPU, SPEC, torch.bfloat16, 128, kv_memory_bytes=40 * PAGE_BYTES)
    assert small_model.max_context_len == 128
    defaults = DEVICE_DEFAULTS["cpu"]
    assert config.max_batch_size == defaults.max_batch_size
    assert config.max_tokens_per_step == defaults.max_tokens_per_step


def test_explicit_limits_that_cannot_be_met_are_rejected():
    with pytest.raises(ValueError, match="max_context_len=1024 exceeds the KV pool"):
        EngineConfig.resolve(
            CPU, SPEC, torch.bfloat16, None, max_context_len=1024, kv_memory_bytes=4 * PAGE_BYTES
        )
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        EngineConfig.resolve(CPU, SPEC, torch.bfloat16, 64, max_context_len=65)
    with pytest.raises(ValueError, match="holds no KV page"):
        EngineConfig.resolve(CPU, SPEC, torch.bfloat16, None, kv_memory_bytes=PAGE_BYTES - 1)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        EngineConfig.resolve(CPU, SPEC, torch.bfloat16, None, max_batch_size=0)


def test_encoder_models_get_no_kv_pool():
    encoder = KVCacheSpec(2, 4, 16, 16, ())
    config = EngineConfig.resolve(CPU, encoder, torch.float32, 512)
    assert config.num_kv_pages == 0 and config.max_context_len == 512


def test_on_cuda_the_pool_gets_the_free_memory_share_less_activations_graphs_and_compilation(monkeypatch):
    free = 64 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 2 * free))
    activations, graphs = 3 * 2**30, 2**30
    config = EngineConfig.resolve(
        torch.device("cuda"),
        SPEC,
        torch.bfloat16,
        1 << 30,
        max_batch_size=4096,
        max_context_len=1 << 20,
        activation_bytes=activations,
        cuda_graph_bytes=graphs,
    )
    budget = int(free * 0.8) - activations - graphs - COMPILE_RESERVE
    assert config.num_kv_pages == budget // PAGE_BYTES + 1
    with pytest.raises(ValueError, match="no memory left on cuda for a KV pool"):
        EngineConfig.resolve(torch.device("cuda"), SPEC, torch.bfloat16, None, cuda_graph_bytes=free)
