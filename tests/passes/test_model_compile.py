"""Each model family compiles whole through the radixc passes and matches eager, with the passes on and off;
a hybrid model keeps one decode graph over 50 decode steps of batch sizes 1..32 and changing lengths."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random

import pytest
import torch
from torch._dynamo.utils import counters

import radixc
from radixc.engine.runner import ModelRunner, build_runner
from radixc.models.presets import build_preset

FAMILIES = ["tiny-llama", "tiny-qwen3", "tiny-gemma2", "tiny-qwen3.5", "tiny-qwen3-next"]
# small_batch_linear only rewrites CUDA decode graphs, and the fusions into the GEMV op it makes have nothing to
# match without it, nor the GDN decode fusion without the Triton backend's kernels: switching them here (native
# backend, CPU) would only multiply the combinations (tests/passes/test_lower_linear.py, test_fuse_linear_cast.py,
# test_fuse_linear_rope_store_kv.py and test_fuse_gdn_decode.py run them on the CPU, the GPU tests in the engine)
NOTHING_TO_MATCH = {
    "small_batch_linear",
    "fuse_silu_mul_linear",
    "fuse_rms_norm_linear",
    "fuse_linear_cast",
    "fuse_input_gate_linear",
    "fuse_linear_rope_store_kv",
    "fuse_gdn_decode",
}
SWITCHES = [f.name for f in dataclasses.fields(radixc.passes.PassConfig) if f.name not in NOTHING_TO_MATCH]


def make_runner(model, compile: bool, max_batch_size: int = 8) -> ModelRunner:
    return build_runner(
        model,
        backend="native",
        compile=compile,
        page_size=4,
        max_batch_size=max_batch_size,
        max_context_len=128,
        kv_memory_bytes=1 << 22,
    )


def run_steps(runner: ModelRunner, prompts, decode_steps: int):
    requests = [runner.builder.new_request() for _ in prompts]
    logits = [runner.extend(requests, prompts)]
    tokens = logits[-1].argmax(-1).tolist()
    for _ in range(decode_steps):
        logits.append(runner.decode(requests, tokens))
        tokens = logits[-1].argmax(-1).tolist()
    return logits


COMBINATIONS = list(itertools.product([True, False], repeat=len(SWITCHES)))


@contextlib.contextmanager
def passes_enabled(switches: tuple[bool, ...]):
    saved = dataclasses.asdict(radixc.passes.config)
    for name, value in zip(SWITCHES, switches, strict=True):
        setattr(radixc.passes.config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(radixc.passes.config, name, value)


@pytest.fixture(scope="module")
def eager_logits():
    """Each family's eager logits, computed once for all switch combinations."""
    cache = {}

    def get(preset):
        if preset not in cache:
            model = build_preset(preset, dtype=torch.float32, seed=3)
            cache[preset] = model, run_steps(make_runner(model, compile=False), PROMPTS, decode_steps=3)
        return cache[preset]

    return get


PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4, 6], [11, 12, 13, 14]]


@pytest.mark.parametrize(
    "switches",
    COMBINATIONS,
    ids=["-".join(f"{n}={int(v)}" for n, v in zip(SWITCHES, c)) for c in COMBINATIONS],
)
@pytest.mark.parametrize("preset", FAMILIES)
def test_compiled_model_matches_eager_without_graph_breaks(preset, switches, eager_logits):
    model, expected = eager_logits(preset)
    torch._dynamo.reset()
    counters.clear()
    manager = radixc.passes.install()
    manager.history.clear()
    with passes_enabled(switches):
        got = run_steps(make_runner(model, compile=True), PROMPTS, decode_steps=3)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
        assert torch.equal(g.argmax(-1), e.argmax(-1))
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2
    # on an FX-graph-cache hit the passes do not run again; when they ran, each switched-off fusion was skipped
    # (fuse_gdn_conv is a choice of lowering, not a pass of its own)
    for counts in manager.history:
        for name, enabled in zip(SWITCHES, switches, strict=True):
            if name != "fuse_gdn_conv":
                assert (name in counts) == enabled
        assert counts.get("fuse_rope_kv_store", 1) > 0  # every family has rotary attention layers


def test_hybrid_decode_never_recompiles_over_50_steps_of_changing_batch_sizes():
    model = build_preset("tiny-qwen3.5", dtype=torch.float32, seed=4)
    runner = make_runner(model, compile=True, max_batch_size=32)
    rng = random.Random(0)
    requests = [runner.builder.new_request() for _ in range(32)]
    torch._dynamo.reset()
    counters.clear()
    runner.extend(requests, [[rng.randrange(100) for _ in range(rng.randint(1, 9))] for _ in requests])
    sizes = [1 + (step * 7) % 32 for step in range(50)]
    assert min(sizes) == 1 and max(sizes) == 32
    for size in sizes:
        chosen = rng.sample(requests, size)  # different requests, so lengths change from step to step
        runner.decode(chosen, [rng.randrange(100) for _ in chosen])
    assert counters["stats"]["unique_graphs"] == 2  # the extend graph and one decode graph
    assert not counters["graph_break"]
