"""Overlapped scheduling on the CPU: decode steps launched before the tokens of the step they follow are read
give every request its greedy tokens alone, through the padded static buffers of CUDA-graph decode too, keep GDN
checkpoints right for the prefix cache, and leave no step or memory behind when requests stop or are aborted."""

from __future__ import annotations

import pytest

from radixc.engine.cuda_graphs import DecodeGraphs
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams

EOS = 1  # tiny presets' eos_token_id


def overlapped(model, **settings) -> LLM:
    defaults = dict(compile=False, page_size=4, max_batch_size=12, progress=False, overlap_scheduling=True)
    return LLM(model, **{**defaults, **settings})


def reference(harness, model, prompts, params) -> list[list[int]]:
    return [
        harness.reference_greedy(model, p, sp.max_new_tokens, stop={EOS, *sp.stop_token_ids})
        for p, sp in zip(prompts, params)
    ]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3.5"])
def test_padded_static_decode_buffers_take_the_previous_step_tokens_on_the_device(harness, preset):
    model = harness.tiny_model(preset)
    prompts = harness.random_prompts(10, 2, 30, seed=40)
    params = [
        SamplingParams(max_new_tokens=4 + i) for i in range(10)
    ]  # one request reaches its limit per step
    llm = overlapped(model)
    runner = llm.runner
    runner.decode_graphs = DecodeGraphs(runner._forward, runner.builder, 12, capture=False)
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == reference(harness, model, prompts, params)
    assert llm.step_stats.overlapped_steps >= llm.step_stats.decode_steps - 1
    llm.clear_prefix_cache()
    harness.assert_pools_empty(llm)


def test_stop_tokens_end_requests_whose_next_step_is_already_running(harness, tiny_llama):
    prompts = harness.random_prompts(12, 2, 30, seed=41)
    free_run = [
        o.token_ids for o in overlapped(tiny_llama).generate(prompts, SamplingParams(max_new_tokens=12))
    ]
    # each request stops at a token of its own free run: its next step was launched before that token was read
    params = [
        SamplingParams(max_new_tokens=12, stop_token_ids=(run[i % len(run)],))
        for i, run in enumerate(free_run)
    ]
    llm = overlapped(tiny_llama, enable_prefix_cache=False)
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == reference(harness, tiny_llama, prompts, params)
    assert any(o.finish_reason == "stop" and len(o.token_ids) < 12 for o in outputs)
    assert llm.step_stats.overlapped_steps > 0
    harness.assert_pools_empty(llm)


def test_hybrid_prefix_cache_resumes_from_gdn_checkpoints_taken_in_overlapped_steps(harness, tiny_qwen3_5):
    prompts = harness.random_prompts(6, 5, 20, seed=42)
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    llm = overlapped(tiny_qwen3_5)
    first = llm.generate(prompts, params)
    assert llm.step_stats.overlapped_steps > 0
    # the next turn's prompts hold the first turn's outputs, whose decode-time GDN checkpoints they resume from
    turns = [
        p + o.token_ids + follow for p, o, follow in zip(prompts, first, harness.random_prompts(6, 1, 6, 43))
    ]
    before = llm.prefix_cache_stats()
    second = llm.generate(turns, params)
    after = llm.prefix_cache_stats()
    assert after.gdn_restores - before.gdn_restores == len(turns)
    assert after.hit_tokens - before.hit_tokens > sum(map(len, prompts))  # resumed inside decoded tokens
    assert [o.token_ids for o in second] == [harness.reference_greedy(tiny_qwen3_5, t, 14) for t in turns]


def test_aborting_every_request_while_a_step_runs_leaves_the_engine_empty(harness, tiny_llama):
    prompts = harness.random_prompts(4, 3, 20, seed=44)
    llm = overlapped(tiny_llama, enable_prefix_cache=False)
    ids = [llm.add_request(p, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p in prompts]
    for _ in range(3):
        llm.step()
    assert llm.step_stats.overlapped_steps > 0  # a decode step is in flight now
    assert all(llm.abort(i) for i in ids)
    assert not llm.has_unfinished and llm.step() == []
    harness.assert_pools_empty(llm)
    (again,) = llm.generate([prompts[0]], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert again.token_ids == harness.reference_greedy(tiny_llama, prompts[0], 5)
