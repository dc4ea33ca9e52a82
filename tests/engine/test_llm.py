"""LLM end to end on tiny models (eager): continuous batching, chunked prefill, preemption and the prefix cache
all give each request exactly the greedy tokens it gets alone, and leave the pools empty."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from radixc.engine.config import gdn_state_bytes
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams

# every test runs with steps in order and overlapped (scheduling fixture)
pytestmark = pytest.mark.usefixtures("scheduling")

EOS = 1  # tiny presets' eos_token_id


def mixed_params(count: int, seed: int, high: int = 24) -> list[SamplingParams]:
    gen = torch.Generator().manual_seed(seed)
    return [
        SamplingParams(max_new_tokens=int(n)) for n in torch.randint(1, high + 1, (count,), generator=gen)
    ]


def expected_tokens(harness, model, prompts, params) -> list[list[int]]:
    return [
        harness.reference_greedy(model, p, sp.max_new_tokens, stop={EOS}) for p, sp in zip(prompts, params)
    ]


def assert_same_tokens(outputs, expected) -> None:
    for i, (out, want) in enumerate(zip(outputs, expected, strict=True)):
        assert out.error is None, (i, out.error)
        assert out.token_ids == want, f"request {i}: got {out.token_ids}, expected {want}"
        assert out.finish_reason == ("stop" if want[-1] == EOS else "length")


def test_64_mixed_requests_batched_give_the_greedy_tokens_of_each_alone(harness, tiny_llama):
    prompts = harness.random_prompts(64, 1, 70, seed=1)
    params = mixed_params(64, seed=2)
    llm = LLM(
        tiny_llama,
        compile=False,
        page_size=4,
        max_batch_size=16,
        max_tokens_per_step=96,
        enable_prefix_cache=False,
        progress=False,
    )
    outputs = llm.generate(prompts, params)
    assert [o.index for o in outputs] == list(range(64))
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert_same_tokens(outputs, expected_tokens(harness, tiny_llama, prompts, params))
    harness.assert_pools_empty(llm)


def test_prefix_cache_reuses_shared_prefixes_and_keeps_tokens(harness, tiny_llama):
    shared = harness.random_prompts(4, 9, 30, seed=3)
    suffixes = harness.random_prompts(48, 1, 12, seed=4)
    prompts = [shared[i % 4] + s for i, s in enumerate(suffixes)]
    params = mixed_params(48, seed=5, high=12)
    llm = LLM(
        tiny_llama, compile=False, page_size=4, max_batch_size=8, max_tokens_per_step=64, progress=False
    )
    expected = expected_tokens(harness, tiny_llama, prompts, params)
    assert_same_tokens(llm.generate(prompts, params), expected)
    first = llm.prefix_cache_stats()
    print(
        f"prefix cache, first pass: hit rate {first.hit_rate:.1%} ({first.hit_tokens}/{first.lookup_tokens})"
    )
    assert first.hit_rate > 0.25
    # the same prompts again: every full page but the one holding the last token comes from the cache
    assert_same_tokens(llm.generate(prompts, params), expected)
    second = llm.prefix_cache_stats()
    hits = second.hit_tokens - first.hit_tokens
    assert hits == sum((len(p) - 1) // 4 * 4 for p in prompts)
    harness.assert_pools_empty(llm, cached_pages=second.cached_pages)
    assert llm.clear_prefix_cache() == second.cached_pages
    harness.assert_pools_empty(llm)
    assert llm.prefix_cache_stats().cached_pages == 0


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no_cache", "prefix_cache"])
def test_kv_pool_too_small_for_all_requests_preempts_and_completes_each(harness, tiny_llama, prefix_cache):
    shared = harness.random_prompts(2, 8, 16, seed=6)
    prompts = [shared[i % 2] + p for i, p in enumerate(harness.random_prompts(24, 1, 24, seed=7))]
    params = mixed_params(24, seed=8, high=20)
    page_bytes = 4 * 2 * 2 * (16 + 16) * 4  # page_size * layers * kv heads * (k + v dim) * float32
    llm = LLM(
        tiny_llama,
        compile=False,
        page_size=4,
        max_batch_size=12,
        max_tokens_per_step=48,
        kv_memory_bytes=24 * page_bytes,
        enable_prefix_cache=prefix_cache,
        progress=False,
    )
    assert llm.runner.kv_pool.capacity_pages == 24  # the longest request needs 15 pages: few fit at once
    outputs = llm.generate(prompts, params)
    assert_same_tokens(outputs, expected_tokens(harness, tiny_llama, prompts, params))
    assert llm.scheduler.num_preemptions > 0
    cached = llm.prefix_cache_stats().cached_pages if prefix_cache else 0
    harness.assert_pools_empty(llm, cached_pages=cached)
    llm.clear_prefix_cache()
    harness.assert_pools_empty(llm)


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no_cache", "prefix_cache"])
def test_hybrid_gdn_model_batched_with_preemption_matches_alone(harness, tiny_qwen3_5, prefix_cache):
    prompts = harness.random_prompts(16, 1, 40, seed=9)
    params = mixed_params(16, seed=10, high=16)
    page_bytes = 4 * 1 * 2 * (16 + 16) * 4  # one full-attention layer
    llm = LLM(
        tiny_qwen3_5,
        compile=False,
        page_size=4,
        max_batch_size=6,
        max_tokens_per_step=32,
        kv_memory_bytes=20 * page_bytes,
        enable_prefix_cache=prefix_cache,
        gdn_checkpoint_memory_bytes=4 * llm_checkpoint_bytes(tiny_qwen3_5),
        progress=False,
    )
    assert type(llm.attn_backend).__name__ == "HybridAttnBackend"
    outputs = llm.generate(prompts, params)
    assert_same_tokens(outputs, expected_tokens(harness, tiny_qwen3_5, prompts, params))
    assert llm.scheduler.num_preemptions > 0
    llm.clear_prefix_cache()
    harness.assert_pools_empty(llm)


def llm_checkpoint_bytes(model) -> int:
    """Bytes of one GDN state checkpoint of a hybrid model."""
    return gdn_state_bytes(model.kv_cache_spec(), torch.float32)


def test_prompt_beyond_context_limit_fails_alone_while_others_complete(harness, tiny_llama):
    prompts = harness.random_prompts(6, 5, 20, seed=11)
    prompts[2] = harness.random_prompts(1, 40, 40, seed=12)[0]  # above the limit
    prompts[4] = prompts[4][:4] * 8  # 32 tokens: exactly the limit, no room for a new token
    prompts[5] = harness.random_prompts(1, 31, 31, seed=13)[0]  # room for one token before the limit
    llm = LLM(tiny_llama, compile=False, page_size=4, max_context_len=32, progress=False)
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for i in (2, 4):
        assert outputs[i].token_ids == [] and outputs[i].finish_reason is None
        assert "max_context_len=32" in outputs[i].error and f"{len(prompts[i])} tokens" in outputs[i].error
    for i in (0, 1, 3):
        assert outputs[i].error is None
        assert outputs[i].token_ids == harness.reference_greedy(tiny_llama, prompts[i], 8)
    assert len(outputs[5].token_ids) == 1 and outputs[5].finish_reason == "length"
    harness.assert_pools_empty(llm, cached_pages=llm.prefix_cache_stats().cached_pages)


def test_invalid_token_ids_and_empty_prompts_fail_only_their_request(tiny_llama):
    llm = LLM(tiny_llama, compile=False, progress=False)
    outputs = llm.generate([[5, 6], [3, 384], [], [7]], SamplingParams(max_new_tokens=2))
    assert [o.error is None for o in outputs] == [True, False, False, True]
    assert "outside the vocabulary [0, 384)" in outputs[1].error
    assert "empty prompt" in outputs[2].error


def test_stop_token_and_model_eos_end_a_request_with_finish_reason_stop(harness, tiny_llama):
    prompt = harness.random_prompts(1, 12, 12, seed=14)[0]
    free_run = harness.reference_greedy(tiny_llama, prompt, 10)
    stop_at = next(i for i, t in enumerate(free_run) if t not in free_run[:i])  # first occurrence
    llm = LLM(tiny_llama, compile=False, progress=False)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[free_run[stop_at]], ignore_eos=True)
    (out,) = llm.generate([prompt], params)
    assert out.token_ids == free_run[: stop_at + 1] and out.finish_reason == "stop"
    llm.eos_token_ids = (free_run[3],)  # the model's EOS ends generation unless ignore_eos
    (eos_out,) = llm.generate(prompt, SamplingParams(max_new_tokens=10))
    assert eos_out.token_ids == free_run[: free_run.index(free_run[3]) + 1]
    (ignored,) = llm.generate(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert ignored.token_ids == free_run and ignored.finish_reason == "length"


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(harness, tiny_llama):
    prompts = harness.random_prompts(9, 3, 30, seed=15)
    seeded = SamplingParams(
        max_new_tokens=12, temperature=1.3, top_k=50, top_p=0.95, seed=1234, ignore_eos=True
    )
    llm = LLM(tiny_llama, compile=False, page_size=4, max_batch_size=4, progress=False)
    (alone,) = llm.generate([prompts[0]], seeded)
    others = [SamplingParams(max_new_tokens=int(n), temperature=0.8, ignore_eos=True) for n in range(3, 11)]
    crowded = llm.generate(prompts, [seeded, *others])
    assert crowded[0].token_ids == alone.token_ids
    (again,) = llm.generate([prompts[0]], seeded)
    assert again.token_ids == alone.token_ids
    other_seed = llm.generate([prompts[0]], dataclasses.replace(seeded, seed=99))
    assert other_seed[0].token_ids != alone.token_ids


def test_stream_yields_each_step_tokens_that_add_up_to_generate(harness, tiny_llama):
    prompts = harness.random_prompts(5, 2, 20, seed=16)
    params = mixed_params(5, seed=17, high=10)
    llm = LLM(tiny_llama, compile=False, page_size=4, progress=False)
    streamed = {i: [] for i in range(5)}
    for index, tokens in llm.stream(prompts, params):
        streamed[index].extend(tokens)
    assert [streamed[i] for i in range(5)] == [o.token_ids for o in llm.generate(prompts, params)]


def test_closing_a_stream_early_frees_every_request(harness, tiny_llama):
    llm = LLM(tiny_llama, compile=False, page_size=4, enable_prefix_cache=False, progress=False)
    stream = llm.stream(harness.random_prompts(6, 5, 20, seed=18), SamplingParams(max_new_tokens=30))
    for _ in range(4):
        next(stream)
    stream.close()
    harness.assert_pools_empty(llm)
    assert not llm.scheduler.has_work
    assert llm.generate([[5, 6, 7]])[0].error is None  # the engine stays usable


def test_debug_log_gives_each_step_its_mode_rows_tokens_and_time(tiny_llama, caplog, scheduling):
    llm = LLM(tiny_llama, compile=False, progress=False)
    with caplog.at_level(logging.DEBUG, logger="radixc.engine"):
        llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    steps = [r.getMessage() for r in caplog.records if " step" in r.getMessage()]
    decode = "decode step (overlapped)" if scheduling else "decode step"
    assert [s.split(" ms")[0].rsplit(", ", 1)[0] for s in steps] == [
        "extend step: 2 requests, 5 tokens",
        f"{decode}: 2 requests, 2 tokens",
        f"{decode}: 2 requests, 2 tokens",
    ]
    assert all(float(s.rsplit(", ", 1)[1].removesuffix(" ms")) > 0 for s in steps)


def test_step_stats_count_each_mode_and_its_time(tiny_llama, scheduling):
    llm = LLM(tiny_llama, compile=False, progress=False)
    llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    first = llm.step_stats.copy()
    assert (first.extend_steps, first.decode_steps, first.overlapped_steps) == (1, 1, scheduling)
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    second = llm.step_stats.since(first)
    # overlapped, every decode step is launched before the tokens of the step it follows are read
    assert (second.extend_steps, second.decode_steps, second.overlapped_steps) == (1, 3, 3 * scheduling)
    assert second.extend_seconds > 0 and second.decode_seconds > 0
    assert llm.step_stats.decode_seconds == pytest.approx(first.decode_seconds + second.decode_seconds)
