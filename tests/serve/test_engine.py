"""AsyncEngine's hand-off to the event loop: a consumer slower than the engine gets the steps it missed merged
into one update per choice, still every token in order, and a group closed midway frees its pages."""

from __future__ import annotations

import asyncio
import time

import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.models.presets import build_preset
from radixc.serve import AsyncEngine


def make_llm() -> LLM:
    return LLM(build_preset("tiny-llama"), compile=False, page_size=4, max_batch_size=8, progress=False)


def test_a_slow_consumer_gets_missed_steps_merged_with_every_token_in_order():
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 256, (int(n),), generator=gen).tolist() for n in (3, 9, 5)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (24, 17, 30)]

    async def consume_slowly(engine: AsyncEngine) -> tuple[list[list[int]], list[str | None], int]:
        group = await engine.add(prompts, params)
        tokens, reasons, most = [[] for _ in prompts], [None] * len(prompts), 0
        async for updates in group:
            assert len({choice for choice, _ in updates}) == len(updates), "one update per choice"
            for choice, update in updates:
                assert reasons[choice] is None, "an update after the choice ended"
                tokens[choice] += update.token_ids
                reasons[choice] = update.finish_reason
                most = max(most, len(update.token_ids))
            await asyncio.to_thread(wait_for_steps, engine, engine.stats.steps + 3)
        return tokens, reasons, most

    tokens, reasons, most = asyncio.run(with_engine(consume_slowly))
    expected = make_llm().generate(prompts, params)
    assert tokens == [o.token_ids for o in expected]
    assert reasons == ["length"] * len(prompts)
    assert most > 1, "the steps the consumer missed were not merged"


def test_closing_a_group_midway_frees_its_pages_and_ends_its_iteration():
    async def close_after_two_updates(engine: AsyncEngine) -> LLM:
        group = await engine.add(
            [[5, 6, 7, 8, 9]] * 2, [SamplingParams(max_new_tokens=200, ignore_eos=True)] * 2
        )
        seen = 0
        async for _ in group:
            seen += 1
            if seen == 2:
                group.close()
        await asyncio.to_thread(wait_for_steps, engine, engine.stats.steps + 2)
        return engine.llm

    llm = asyncio.run(with_engine(close_after_two_updates))
    assert not llm.has_unfinished
    pool, cached = llm.runner.kv_pool, llm.prefix_cache_stats().cached_pages
    assert pool.num_free_pages + cached == pool.capacity_pages


async def with_engine(body):
    engine = AsyncEngine(make_llm)
    engine.start()
    try:
        await asyncio.to_thread(wait_ready, engine)
        return await body(engine)
    finally:
        await engine.shutdown()


def wait_ready(engine: AsyncEngine, timeout: float = 60.0) -> None:
    wait_until(lambda: engine.unavailable_reason() is None, timeout)


def wait_for_steps(engine: AsyncEngine, steps: int) -> None:
    """Until the engine ran `steps` steps in all, or has nothing left to run."""
    wait_until(lambda: engine.stats.steps >= steps or engine.stats.running_requests == 0, 30.0)


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)
