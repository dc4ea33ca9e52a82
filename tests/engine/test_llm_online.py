"""LLM's online API (add_request / step / abort): requests added while others run get the tokens they get
alone, abort frees a request's pages at once, bad prompts fail alone, and a failing step fails only requests."""

from __future__ import annotations

import pytest

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams

# every test runs with steps in order and overlapped (scheduling fixture)
pytestmark = pytest.mark.usefixtures("scheduling")

PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


def online(tiny_llama) -> LLM:
    return LLM(
        tiny_llama, compile=False, page_size=4, max_batch_size=8, max_tokens_per_step=64, progress=False
    )


def run_step(llm: LLM, tokens: dict[int, list[int]], finish: dict[int, str]) -> None:
    for update in llm.step():
        tokens.setdefault(update.request_id, []).extend(update.token_ids)
        if update.finished:
            finish[update.request_id] = update.finish_reason


def test_requests_added_between_steps_get_their_offline_tokens(harness, tiny_llama):
    prompts = harness.random_prompts(12, 1, 30, seed=11)
    llm = online(tiny_llama)
    tokens, finish, ids = {}, {}, []
    for prompt in prompts:  # one new request per step, joining those already decoding
        ids.append(llm.add_request(prompt, PARAMS))
        run_step(llm, tokens, finish)
    for _ in range(200):
        if not llm.has_unfinished:
            break
        run_step(llm, tokens, finish)
    assert not llm.has_unfinished
    assert len(set(ids)) == len(ids)
    expected = [harness.reference_greedy(tiny_llama, p, 10) for p in prompts]
    assert [tokens[i] for i in ids] == expected
    assert all(finish[i] == "length" for i in ids)
    harness.assert_pools_empty(llm, cached_pages=llm.prefix_cache_stats().cached_pages)


def test_abort_frees_a_running_request_pages_at_once_and_others_continue(harness, tiny_llama):
    prompts = harness.random_prompts(3, 9, 20, seed=12)
    llm = LLM(tiny_llama, compile=False, page_size=4, enable_prefix_cache=False, progress=False)
    pool = llm.runner.kv_pool
    ids = [llm.add_request(p, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p in prompts]
    for _ in range(4):
        llm.step()
    held = pool.capacity_pages - pool.num_free_pages
    assert llm.abort(ids[1]) and not llm.abort(ids[1]) and not llm.abort(12345)
    assert pool.capacity_pages - pool.num_free_pages < held
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while llm.has_unfinished:
        for update in llm.step():
            assert update.request_id != ids[1]
            tokens[update.request_id] += update.token_ids
    assert len(tokens[ids[0]]) == len(tokens[ids[2]]) > 20
    harness.assert_pools_empty(llm)


def test_bad_prompts_raise_at_add_and_engine_state_guards(tiny_llama):
    llm = online(tiny_llama)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([3, 10**6], PARAMS)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.add_request([], PARAMS)
    assert not llm.has_unfinished
    request_id = llm.add_request([3, 4, 5], PARAMS)
    with pytest.raises(RuntimeError, match="still running"):
        llm.generate([[3, 4]], PARAMS)
    assert llm.abort(request_id)
    stream = llm.stream([[3, 4]], PARAMS)
    next(stream)
    with pytest.raises(RuntimeError, match="still running"):
        llm.add_request([3, 4], PARAMS)
    stream.close()


def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(harness, tiny_llama, monkeypatch):
    llm = online(tiny_llama)
    ids = [llm.add_request(p, PARAMS) for p in harness.random_prompts(3, 2, 9, seed=13)]
    llm.step()  # prefill

    def failing_decode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(llm.runner, "decode", failing_decode)
    updates = llm.step()
    assert sorted(u.request_id for u in updates) == ids
    assert all(u.finished and "RuntimeError: boom" in u.error for u in updates)
    assert not llm.has_unfinished
    monkeypatch.undo()
    harness.assert_pools_empty(llm, cached_pages=llm.prefix_cache_stats().cached_pages)
    prompt = [7, 8, 9]
    [out] = llm.generate([prompt], PARAMS)
    assert out.token_ids == harness.reference_greedy(tiny_llama, prompt, 10)
