"""Defunctionalization: the radixc ops write the pools in place on every torch, so the compiled code never copies
a pool buffer, for every model family in both forward modes on every backend that runs here; a buffer whose old
value is read later keeps the functional form; and a decode step costs the same with a 1.5 GiB pool as with 8 MiB."""

from __future__ import annotations

import operator
import statistics
import time

import pytest
import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2
from torch._subclasses.fake_tensor import FakeTensorMode

import radixc
from radixc.engine.backends import BACKENDS
from radixc.engine.runner import build_runner
from radixc.models.presets import build_preset
from radixc.passes.defunctionalize import Defunctionalize

FAMILIES = ["tiny-llama", "tiny-qwen3", "tiny-gemma2", "tiny-qwen3.5", "tiny-qwen3-next"]


def _pool_buffers(runner) -> list[torch.Tensor]:
    buffers = []
    if runner.kv_pool is not None:
        buffers += [b for b in runner.kv_pool.k_buffer + runner.kv_pool.v_buffer if b is not None]
    if runner.gdn_pool is not None:
        buffers += runner.gdn_pool.conv_state + runner.gdn_pool.ssm_state
    return buffers


def _backends() -> list:
    """Every backend that runs on this machine's CPU (Triton under the interpreter), marked as it needs."""
    cpu = torch.device("cpu")
    names = [name for name, cls in BACKENDS.items() if cls.unavailable_reason(cpu) is None]
    return [pytest.param(name, marks=pytest.mark.triton) if name == "triton" else name for name in names]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("preset", FAMILIES)
def test_no_family_copies_a_pool_buffer_in_extend_or_decode(ph, preset, backend):
    model = build_preset(preset, dtype=torch.float32, seed=5)
    runner = build_runner(
        model,
        backend=backend,
        compile=False,
        page_size=4,
        max_batch_size=4,
        max_context_len=64,
        kv_memory_bytes=1 << 20,
    )
    builder = runner.builder
    requests = [builder.new_request() for _ in range(2)]
    compiled = torch.compile(model, fullgraph=True)
    codes: list[str] = []
    torch._dynamo.reset()
    with torch.inference_mode(), ph.capture_output_code(codes):
        batch = builder.extend(requests, [[5, 9, 2, 7, 1], [4, 6]])
        compiled(batch.input_ids, batch.positions, batch)
        batch = builder.decode(requests, [3, 8])
        compiled(batch.input_ids, batch.positions, batch)
    assert len(codes) == 2  # one graph per forward mode
    for code in codes:
        assert f"radixc.{backend}_" in code
        assert ph.pool_copies(code, _pool_buffers(runner)) == []


def test_a_buffer_read_after_the_write_keeps_the_functional_form(caplog):
    """Were a later node to read a pool buffer's old value, writing it in place would change what that node
    sees: the wrapper stays (Inductor then copies), and the pass says so."""
    graph = torch.fx.Graph()
    with FakeTensorMode() as mode:
        values = {
            "positions": torch.zeros(3, dtype=torch.int64),
            "q": torch.randn(3, 8),
            "k": torch.randn(3, 8),
            "v": torch.randn(3, 8),
            "cos_sin_cache": torch.randn(16, 8),
            "k_cache": torch.randn(16, 1, 8),
            "v_cache": torch.randn(16, 1, 8),
            "out_cache_loc": torch.zeros(3, dtype=torch.int64),
        }
    nodes = {}
    for name, val in values.items():
        nodes[name] = graph.placeholder(name)
        nodes[name].meta["val"] = val
    op = torch.ops.radixc.rope_store_kv.default
    kwargs = {name: nodes[name] for name in values if name not in ("k_cache", "v_cache")}
    kwargs.update(q_norm_weight=None, k_norm_weight=None, head_size=8, is_neox=True, norm_eps=0.0)
    kwargs.update(norm_zero_centered=False, backend="native", forward_mode="extend")
    kwargs.update(
        _k_cache_base_index=0, _v_cache_base_index=1, _all_bases=[nodes["k_cache"], nodes["v_cache"]]
    )
    wrapper = graph.call_function(auto_functionalized_v2, (op,), kwargs)
    with mode:
        wrapper.meta["val"] = (values["q"].clone(), values["k_cache"].clone(), values["v_cache"].clone())
    items = [graph.call_function(operator.getitem, (wrapper, i)) for i in range(3)]
    stale = graph.call_function(
        torch.ops.aten.sum.default, (nodes["k_cache"],)
    )  # the old k_cache, read after
    graph.output((items[0], items[1], items[2], stale))
    with caplog.at_level("WARNING", logger="radixc.passes"):
        assert Defunctionalize().apply(graph) == 0
    assert wrapper in graph.nodes and "keeps its functional form" in caplog.text


def _decode_ms(kv_memory_bytes: int) -> float:
    """Median ms of compiled tiny-llama decode steps of batch 4 over a pool of the given size."""
    model = build_preset("tiny-llama", dtype=torch.float32, seed=1)
    runner = build_runner(
        model,
        backend="native",
        page_size=16,
        max_batch_size=4,
        max_context_len=256,
        kv_memory_bytes=kv_memory_bytes,
    )
    requests = [runner.builder.new_request() for _ in range(4)]
    runner.extend(requests, [[7] * 32] * 4)
    times = []
    for step in range(12):
        start = time.perf_counter()
        runner.decode(requests, [step + 2] * 4)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def test_a_decode_step_costs_the_same_with_a_1_5_gib_pool_as_with_8_mib():
    torch._dynamo.reset()
    small = _decode_ms(8 << 20)
    large = _decode_ms(3 << 29)  # 1.5 GiB
    radixc.passes.install()  # (both runners compiled through the radixc passes)
    # copying 1.5 GiB would take well over 100 ms here; a step takes a few ms either way
    assert large < 2 * small + 5, (small, large)
