"""The one-kernel GDN decode step on compiled decode graphs: the hybrid models' GDN layers (conv, delta rule and
their gated RMSNorm) become `radixc::gdn_decode_step` and decode to eager's logits through it, each step
reading the conv and recurrent states the steps before it wrote; a GDN layer without a gated norm still fuses
its conv and rule; off, the graph keeps the three kernels. The Triton kernels run under the interpreter."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import radixc
from radixc.models.presets import build_preset
from radixc.passes.fuse_gdn_decode import FuseGDNDecode
from radixc.passes.lower_linear import LowerSmallBatchLinear

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="runs the kernels on CPU tensors under the interpreter; on a GPU the CUDA-graph tests decode through it",
    ),
]

# GDN layers of each preset, all with a gated norm
GDN_LAYERS = {"tiny-qwen3.5": 3, "tiny-qwen3-next": 3}


def _compiled_decode(ph, model, prompts, record: bool):
    manager = radixc.passes.install()
    manager.history.clear()
    manager.recorder = [] if record else None
    torch._dynamo.reset()
    try:
        with (
            mock.patch.object(LowerSmallBatchLinear, "device_types", ("cpu",)),
            torch._inductor.config.patch(fx_graph_cache=False),
        ):
            logits = ph.greedy_decode_logits(model, "triton", True, prompts, steps=4)
        return logits, manager.history, manager.recorder
    finally:
        manager.recorder = None


# each preset at one row count (the interpreter makes a compiled decode of a hybrid model slow for CI); the kernel
# tests cover every row count
@pytest.mark.parametrize(("preset", "batch"), [("tiny-qwen3.5", 1), ("tiny-qwen3-next", 3)])
def test_compiled_decode_through_the_fused_gdn_step_gives_eager_logits(ph, preset, batch):
    model = build_preset(preset, dtype=torch.float32, seed=9)
    prompts = [[5, 9, 2, 7], [4, 6], [11, 12, 13]][:batch]
    expected = ph.greedy_decode_logits(model, "triton", False, prompts, steps=4)
    with ph.switches(fuse_gdn_decode=True):
        got, history, records = _compiled_decode(ph, model, prompts, record=True)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    assert [counts[FuseGDNDecode.name] for counts in history] == [0, GDN_LAYERS[preset]]
    decode_graph = records[-1][-1].after or records[-1][-1].before
    fused = [line for line in decode_graph.splitlines() if "radixc.gdn_decode_step" in line]
    assert len(fused) == GDN_LAYERS[preset]
    assert all("gate: %" in line and "norm_weight: %" in line for line in fused)
    for leftover in ("triton_causal_conv1d", "triton_gated_delta_rule"):
        assert leftover not in decode_graph


def test_switched_off_the_graph_keeps_the_three_kernels(ph):
    model = build_preset("tiny-qwen3.5", dtype=torch.float32, seed=9)
    with ph.switches(fuse_gdn_decode=False):
        _, history, records = _compiled_decode(ph, model, [[5, 9, 2]], record=True)
    decode_graph = records[-1][-1].after or records[-1][-1].before
    assert FuseGDNDecode.name not in history[-1]
    assert decode_graph.count("triton_gated_delta_rule_decode.default") == GDN_LAYERS["tiny-qwen3.5"]
    assert "aten.rsqrt" in decode_graph


def test_a_gdn_layer_without_a_gated_norm_fuses_conv_and_rule(ph):
    """The pass harness's GDN block returns its layer's output: conv and rule become one step without a norm,
    decode gives eager's outputs and leaves the states eager leaves."""
    from radixc.engine import TritonBackend

    torch.manual_seed(3)
    block = ph.GDNBlock()
    expected, _, _, eager_pool = ph.run_gdn(block, compiled=False, backend=TritonBackend())
    outputs, history, code, pool = ph.run_gdn(
        block, compiled=True, backend=TritonBackend(), fuse_gdn_decode=True
    )
    for e, g in zip(expected, outputs, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    for e, g in zip(
        eager_pool.conv_state + eager_pool.ssm_state, pool.conv_state + pool.ssm_state, strict=True
    ):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    assert [counts[FuseGDNDecode.name] for counts in history] == [0, 1, 1][: len(history)]
    assert "gdn_decode_step" in code
