"""CUDA graphs on a GPU: replayed decode and extend graphs give the tokens of uncaptured compiled steps for every
family, of steps in order when overlapped, of plain launches when their kernels start under programmatic
dependent launch, and of the unfused kernels with the split-K GEMV, the qkv GEMV with RoPE and the KV store
in its epilogue and the one-kernel GDN decode step; batch sizes and lengths changing every step never
recapture or recompile, and a request leaving a captured batch leaves no trace in the others."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.ops.pdl import PDL_ENV

from .conftest import random_prompts, tiny_model

pytestmark = pytest.mark.gpu

FAMILIES = ["tiny-llama", "tiny-qwen3", "tiny-gemma2", "tiny-qwen3.5", "tiny-qwen3-next"]


def _llm(model, cuda_graphs: bool, overlap_scheduling: bool | None = None) -> LLM:
    return LLM(
        model,
        backend="triton",
        page_size=4,
        max_batch_size=24,
        max_context_len=256,
        cuda_graphs=cuda_graphs,
        kv_memory_bytes=1 << 26,
        progress=False,
        overlap_scheduling=overlap_scheduling,
    )


@pytest.mark.parametrize("preset", FAMILIES)
def test_replayed_graphs_give_the_tokens_of_uncaptured_decode(preset: str) -> None:
    model = tiny_model(preset).to("cuda")
    prompts = random_prompts(19, 3, 40, seed=1)
    params = SamplingParams(max_new_tokens=12)
    graphs = _llm(model, True)
    assert graphs.runner.decode_graphs.captured_sizes == [1, 2, 4, 8, 16, 24]
    assert graphs.runner.extend_graphs.captured_sizes == [16, 32, 64, 128, 256, 512, 1024, 2048]
    plain = _llm(model, False)
    assert plain.runner.decode_graphs is None and plain.runner.extend_graphs is None
    captured = [o.token_ids for o in graphs.generate(prompts, params)]
    uncaptured = [o.token_ids for o in plain.generate(prompts, params)]
    assert captured == uncaptured
    assert graphs.runner.extend_graphs.replays > 0 and graphs.runner.decode_graphs.replays > 0


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3.5"])
def test_overlapped_scheduling_gives_the_tokens_of_steps_in_order(preset: str) -> None:
    """Decode steps replayed before the step they follow has been read back: stop tokens and length limits end
    requests while their next step runs, and the prefix cache keeps the pages of both."""
    model = tiny_model(preset).to("cuda")
    prompts = random_prompts(19, 3, 40, seed=4)
    in_order = _llm(model, True, overlap_scheduling=False)
    assert _llm(model, True).overlap_scheduling  # the default on CUDA
    free_run = [o.token_ids for o in in_order.generate(prompts, SamplingParams(max_new_tokens=20))]
    params = [
        SamplingParams(max_new_tokens=8 + i % 13, stop_token_ids=(run[(3 * i) % len(run)],))
        for i, run in enumerate(free_run)
    ]
    expected = [o.token_ids for o in in_order.generate(prompts, params)]
    overlapped = _llm(model, True, overlap_scheduling=True)
    assert [o.token_ids for o in overlapped.generate(prompts, params)] == expected
    assert [o.token_ids for o in overlapped.generate(prompts, params)] == expected  # from the prefix cache
    assert overlapped.step_stats.overlapped_steps > 0


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3.5"])
def test_programmatic_dependent_launch_changes_no_token(preset: str, monkeypatch) -> None:
    """Replayed steps whose kernels, radixc's and Inductor's, start under PDL (`RADIXC_PDL=all`) give the tokens
    of plain launches (the default, `1`, chains radixc's kernels only, in every other GPU test)."""
    model = tiny_model(preset).to("cuda")
    prompts = random_prompts(19, 3, 40, seed=6)
    params = SamplingParams(max_new_tokens=16)
    monkeypatch.setenv(PDL_ENV, "all")
    with_pdl = [o.token_ids for o in _llm(model, True).generate(prompts, params)]
    monkeypatch.setenv(PDL_ENV, "0")
    torch._dynamo.reset()
    assert [o.token_ids for o in _llm(model, True).generate(prompts, params)] == with_pdl


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3.5", "tiny-qwen3-next"])
def test_fused_kernels_change_no_token(preset: str, monkeypatch, tmp_path) -> None:
    """The fused kernels decode to the tokens of the kernels they replace: split-K GEMV tiles (here made to fit
    the tiny models' K and chosen wherever one is a candidate; the tuner would time them against the rest)
    against none, the qkv GEMV with RoPE and the KV store in its epilogue (tiny-llama) against the GEMV and the
    rope + store kernel, the LM head's float32 cast in its GEMV against the cast kernel, the gated attention's
    output gate in its o_proj GEMV against Inductor's gate kernel (both on by default), and the GDN layers'
    decode step in one kernel (switched on here; tiny-qwen3.5, and tiny-qwen3-next, whose v heads
    read k heads two by two) against the conv, recurrent and Inductor's norm kernels; arrival counters end at
    zero."""
    import radixc
    from radixc.ops.triton import _utils, gemv, tuning_cache

    model = tiny_model(preset).to("cuda")
    prompts = random_prompts(23, 4, 60, seed=8)
    params = SamplingParams(max_new_tokens=16)
    with monkeypatch.context() as unfused:
        unfused.setenv(gemv.SPLIT_K_ENV, "0")
        unfused.setattr(radixc.passes.config, "fuse_linear_rope_store_kv", False)
        unfused.setattr(radixc.passes.config, "fuse_linear_cast", False)
        unfused.setattr(radixc.passes.config, "fuse_input_gate_linear", False)
        torch._dynamo.reset()  # no graph compiled with other switches is reused
        expected = [o.token_ids for o in _llm(model, True).generate(prompts, params)]
    monkeypatch.setattr(radixc.passes.config, "fuse_gdn_decode", True)  # off by default until timed here
    monkeypatch.setattr(gemv, "SPLIT_K_TILES", (gemv.LinearTiles(16, 32, 4, 2, 2),))
    split_k_choices = []

    def split_k_first(candidates):
        split = [tiles for tiles in candidates if tiles is not None and tiles.split_k > 1]
        split_k_choices.extend(split[:1])
        return split[0] if split else None

    monkeypatch.setattr(gemv, "fastest", split_k_first)
    monkeypatch.setattr(gemv, "_fastest", {})
    monkeypatch.setattr(tuning_cache, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(gemv, "_stored", tuning_cache.TuningCache("small_batch_linear"))
    torch._dynamo.reset()
    assert [o.token_ids for o in _llm(model, True).generate(prompts, params)] == expected
    assert split_k_choices
    assert all(not arrivals.any() for arrivals in _utils._arrival_counters.values())


def test_200_steps_of_changing_batch_sizes_never_recapture_or_recompile() -> None:
    model = tiny_model("tiny-qwen3.5").to("cuda")
    llm = _llm(model, True)
    runner = llm.runner
    rng = random.Random(0)
    requests = [runner.builder.new_request() for _ in range(24)]
    runner.extend(requests, [[rng.randrange(2, 300) for _ in range(rng.randint(1, 30))] for _ in requests])
    graphs = {**runner.decode_graphs._graphs, **runner.extend_graphs._graphs}
    counters.clear()
    for step in range(200):
        chosen = rng.sample(requests, rng.randint(1, 24))
        if step % 10 == 0:  # extend steps of changing sizes between them
            runner.extend(chosen, [[rng.randrange(2, 300) for _ in range(rng.randint(1, 5))] for _ in chosen])
        else:
            runner.decode(chosen, [rng.randrange(2, 300) for _ in chosen])
    assert counters["stats"]["unique_graphs"] == 0
    assert {**runner.decode_graphs._graphs, **runner.extend_graphs._graphs} == graphs
    assert runner.extend_graphs.replays == 21 and runner.decode_graphs.replays == 180


def test_a_request_leaving_a_captured_batch_leaves_no_trace_in_the_others() -> None:
    model = tiny_model("tiny-llama").to("cuda")
    prompts = random_prompts(6, 5, 30, seed=3)
    llm = _llm(model, True)
    short = SamplingParams(max_new_tokens=3)
    long = SamplingParams(max_new_tokens=16)
    mixed = llm.generate(prompts, [short if i % 2 else long for i in range(len(prompts))])
    alone = [llm.generate([p], long)[0].token_ids for p in prompts[::2]]
    assert [o.token_ids for o in mixed[::2]] == alone


def test_replayed_logits_equal_uncaptured_ones_until_the_next_step() -> None:
    """Every graph of a set copies its logits into one buffer (no logits memory per bucket): runner.decode and
    runner.extend return views of it, valid until the next step."""
    model = tiny_model("tiny-llama").to("cuda")
    rng = random.Random(2)
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randint(5, 60))] for _ in range(7)]
    schedule = [sorted(rng.sample(range(7), rng.randint(1, 7))) for _ in range(8)]
    tokens = [[rng.randrange(2, 300) for _ in rows] for rows in schedule]
    kept = {}
    for cuda_graphs in (True, False):
        runner = _llm(model, cuda_graphs).runner
        requests = [runner.builder.new_request() for _ in prompts]
        kept[cuda_graphs] = [runner.extend(requests, prompts).clone()]
        kept[cuda_graphs] += [
            runner.decode([requests[i] for i in rows], step_tokens).clone()
            for rows, step_tokens in zip(schedule, tokens, strict=True)
        ]
    for captured, uncaptured in zip(kept[True], kept[False], strict=True):
        torch.testing.assert_close(captured, uncaptured, rtol=1e-3, atol=1e-3)
