"""The output-gate fusion: `small_batch_linear(a * sigmoid(g))` becomes `small_batch_linear(a, input_gate=g)` in
the forms the post-grad graph holds it, and nothing else does; compiled tiny-qwen3.5 decode through it gives
eager's logits. Graphs are traced with Inductor's decompositions (as post-grad graphs are); the Triton kernels
run under the interpreter on the CPU."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

import radixc
from radixc.models.presets import build_preset
from radixc.passes.fuse_input_gate_linear import FuseInputGateLinear
from radixc.passes.graph_utils import named_args, radixc_calls
from radixc.passes.lower_linear import LowerSmallBatchLinear

pytestmark = pytest.mark.triton

HIDDEN, OUT = 48, 24
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _linear(x, weight, residual=None):
    return torch.ops.radixc.small_batch_linear(x, weight, None, residual)


def gate_after(attn, qg, weight):
    return _linear(attn * torch.sigmoid(qg[:, HIDDEN:]), weight)


def gate_before_with_residual(attn, qg, weight):
    return _linear(torch.sigmoid(qg[:, HIDDEN:]) * attn, weight, qg[:, :OUT])


def float32_sigmoid(attn, qg, weight):
    return _linear(attn * torch.sigmoid(qg[:, HIDDEN:].float()).to(attn.dtype), weight)


def gate_used_twice(attn, qg, weight):
    gated = attn * torch.sigmoid(qg[:, HIDDEN:])
    return _linear(gated, weight) + gated[:, :OUT]


def sigmoid_used_twice(attn, qg, weight):
    gate = torch.sigmoid(qg[:, HIDDEN:])
    return _linear(attn * gate, weight) + gate[:, :OUT]


def broadcast_gate(attn, qg, weight):
    return _linear(attn * torch.sigmoid(qg[:1, HIDDEN:]), weight)


def product_of_two_inputs(attn, qg, weight):
    return _linear(attn * qg[:, HIDDEN:], weight)


def _trace(fn, dtype: torch.dtype, rows: int = 3):
    gen = torch.Generator().manual_seed(rows)
    attn = torch.randn(rows, HIDDEN, generator=gen).to(DEVICE, dtype)
    qg = torch.randn(rows, 2 * HIDDEN, generator=gen).to(DEVICE, dtype)  # the gate, a slice of a wider row
    weight = (torch.randn(OUT, HIDDEN, generator=gen) / HIDDEN**0.5).to(DEVICE, dtype)
    inputs = (attn, qg, weight)
    return make_fx(fn, decomposition_table=select_decomp_table())(*inputs), inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(
    "fn", [gate_after, gate_before_with_residual, float32_sigmoid], ids=lambda fn: fn.__name__
)
def test_each_gate_form_folds_with_the_same_result(fn, dtype):
    graph_module, inputs = _trace(fn, dtype)
    expected = graph_module(*inputs)
    assert FuseInputGateLinear()(graph_module.graph) == 1
    graph_module.recompile()
    (linear,) = radixc_calls(graph_module.graph, "small_batch_linear")
    assert named_args(linear)["input_gate"] is not None
    assert not any(n.target is torch.ops.aten.sigmoid.default for n in graph_module.graph.nodes)
    got = graph_module(*inputs)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    "fn",
    [gate_used_twice, sigmoid_used_twice, broadcast_gate, product_of_two_inputs],
    ids=lambda fn: fn.__name__,
)
def test_shared_broadcast_or_ungated_products_stay_unfused(fn):
    graph_module, _ = _trace(fn, torch.float16)
    assert FuseInputGateLinear()(graph_module.graph) == 0


def test_a_normalised_input_is_left_alone():
    def normed(attn, qg, weight):
        gated = attn * torch.sigmoid(qg[:, HIDDEN:])
        return torch.ops.radixc.small_batch_linear(
            gated, weight, None, norm_weight=qg[0, :HIDDEN], norm_eps=1e-6
        )

    graph_module, _ = _trace(normed, torch.float32)
    assert FuseInputGateLinear()(graph_module.graph) == 0


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="runs the kernels on CPU tensors under the interpreter; on a GPU the CUDA-graph tests decode through it",
)
def test_compiled_qwen35_decode_through_the_folded_gate_gives_eager_logits(ph):
    """One row (a compiled hybrid decode under the interpreter is slow for CI; the kernel tests cover every row
    count): tiny-qwen3.5's one attention layer folds its gate."""
    model = build_preset("tiny-qwen3.5", dtype=torch.float32, seed=5)
    prompts = [[5, 9, 2, 7]]
    expected = ph.greedy_decode_logits(model, "triton", False, prompts, steps=3)
    manager = radixc.passes.install()
    manager.history.clear()
    torch._dynamo.reset()
    with (
        ph.switches(fuse_input_gate_linear=True),
        mock.patch.object(LowerSmallBatchLinear, "device_types", ("cpu",)),
        torch._inductor.config.patch(fx_graph_cache=False),
    ):
        got = ph.greedy_decode_logits(model, "triton", True, prompts, steps=3)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    assert [counts[FuseInputGateLinear.name] for counts in manager.history] == [0, 1]


def test_on_by_default():
    assert radixc.passes.PassConfig().fuse_input_gate_linear
