"""AsyncEngine and its engine process: a consumer slower than the engine gets the steps it missed merged into one
update per choice, still every token in order; a group closed midway frees its pages; shutdown ends the engine
process."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path

import pytest
import torch

import radixc.serve.engine
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.serve import AsyncEngine
from radixc.serve.engine import engine_start_method
from radixc.serve.messages import EngineStats

make_llm = functools.partial(LLM, "tiny-llama", compile=False, page_size=4, max_batch_size=8, progress=False)


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
            await wait_for_steps(engine, (await engine.stats()).steps + 3)
        return tokens, reasons, most

    tokens, reasons, most = asyncio.run(with_engine(consume_slowly))
    expected = make_llm().generate(prompts, params)
    assert tokens == [o.token_ids for o in expected]
    assert reasons == ["length"] * len(prompts)
    assert most > 1, "the steps the consumer missed were not merged"


def test_a_stream_interval_takes_the_first_token_then_chunks_of_n_then_the_end():
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 256, (int(n),), generator=gen).tolist() for n in (6, 2, 11)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (23, 9, 30)]

    async def consume(engine: AsyncEngine) -> list[list[list[int]]]:
        with pytest.raises(ValueError, match="stream_interval must be at least 1, not 0"):
            await engine.add(prompts, params, stream_interval=0)
        group = await engine.add(prompts, params, stream_interval=4)
        chunks: list[list[list[int]]] = [[] for _ in prompts]
        async for updates in group:
            for choice, update in updates:
                chunks[choice].append(update.token_ids)
        return chunks

    chunks = asyncio.run(with_engine(consume))
    expected = make_llm().generate(prompts, params)
    assert [sum(c, []) for c in chunks] == [o.token_ids for o in expected]
    for choice, pieces in enumerate(chunks):
        # every chunk between the first and the last holds 4 tokens or more
        assert all(len(piece) >= 4 for piece in pieces[1:-1]), (choice, [len(p) for p in pieces])
        assert len(pieces) <= 2 + (params[choice].max_new_tokens - 1) // 4, [len(p) for p in pieces]
    # taken at once, not once 4 tokens waited (the steps run in another process: one more may have come in)
    assert all(len(pieces[0]) < 4 for pieces in chunks), "the first token waited for the interval"


def test_closing_a_group_midway_frees_its_pages_and_ends_its_iteration():
    async def close_after_two_updates(engine: AsyncEngine) -> EngineStats:
        group = await engine.add(
            [[5, 6, 7, 8, 9]] * 2, [SamplingParams(max_new_tokens=200, ignore_eos=True)] * 2
        )
        seen = 0
        async for _ in group:
            seen += 1
            if seen == 2:
                group.close()
        assert seen == 2
        return await wait_for_steps(engine, (await engine.stats()).steps + 2)

    stats = asyncio.run(with_engine(close_after_two_updates))
    assert stats.running_requests == 0 and stats.requests_aborted == 2
    assert stats.free_kv_pages + stats.cached_kv_pages == stats.kv_pages
    assert stats.free_request_rows == stats.request_rows


async def with_engine(body, **engine_options):
    """Run `body(engine)` on a ready engine; afterwards its process must be gone."""
    engine = AsyncEngine(make_llm, **engine_options)
    engine.start()
    try:
        await wait_ready(engine)
        return await body(engine)
    finally:
        await engine.shutdown()
        assert_exited(engine.pid)


async def wait_ready(engine: AsyncEngine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.unavailable_reason() is not None:
        assert engine.error is None, engine.error
        assert time.monotonic() < deadline, "the engine did not become ready"
        await asyncio.sleep(0.02)


async def wait_for_steps(engine: AsyncEngine, steps: int) -> EngineStats:
    """The engine's stats once it ran `steps` steps in all, or has nothing left to run."""
    deadline = time.monotonic() + 30
    while True:
        stats = await engine.stats()
        if stats.steps >= steps or stats.running_requests == 0:
            return stats
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def assert_exited(pid: int, timeout: float = 10.0) -> None:
    """The process `pid` ends (and is reaped) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.02)


def test_engine_cpus_keep_the_engine_process_on_them():
    cpu = min(os.sched_getaffinity(0))

    async def affinity(engine: AsyncEngine) -> set[int]:
        return os.sched_getaffinity(engine.pid)

    assert asyncio.run(with_engine(affinity, engine_cpus=[cpu])) == {cpu}
    assert os.sched_getaffinity(0) != {cpu} or len(os.sched_getaffinity(0)) == 1  # this process is not pinned


def test_engines_start_through_the_forkserver_and_are_spawned_where_cuda_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_start_method() == "forkserver"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_start_method() == "spawn"


def test_a_spawned_engine_process_decodes_the_offline_tokens(monkeypatch):
    monkeypatch.setattr(radixc.serve.engine, "engine_start_method", lambda: "spawn")
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 256, (int(n),), generator=gen).tolist() for n in (4, 7)]
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)

    async def generate(engine: AsyncEngine) -> list[list[int]]:
        group = await engine.add(prompts, [params] * len(prompts))
        tokens = [[] for _ in prompts]
        async for updates in group:
            for choice, update in updates:
                tokens[choice] += update.token_ids
        return tokens

    assert asyncio.run(with_engine(generate)) == [o.token_ids for o in make_llm().generate(prompts, params)]
