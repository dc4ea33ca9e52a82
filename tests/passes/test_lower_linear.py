"""Decode linear layers lowered to `radixc::small_batch_linear` (the Triton GEMV kernel): only in decode graphs,
every linear form a model produces (plain, with a bias, with a residual Inductor folded into addmm, the LM head),
and the same logits as eager. The pass rewrites CUDA graphs only; here it is widened to the CPU, where the
kernel runs under the Triton interpreter."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters

import radixc
from radixc.models.presets import build_preset
from radixc.passes.fuse_rms_norm_linear import FuseRMSNormLinear
from radixc.passes.fuse_silu_mul_linear import FuseSiluMulLinear
from radixc.passes.lower_linear import LowerSmallBatchLinear

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="runs the kernel on CPU tensors under the interpreter; on a GPU the CUDA-graph tests decode through it",
    ),
]

PASS = LowerSmallBatchLinear.name
FUSED = FuseSiluMulLinear.name
NORMED = FuseRMSNormLinear.name


@pytest.fixture
def on_cpu():
    with mock.patch.object(LowerSmallBatchLinear, "device_types", ("cpu",)):
        yield


def test_decode_graph_linears_run_the_kernel_extend_graphs_keep_aten(ph, on_cpu):
    torch.manual_seed(0)
    model = ph.RopeAttention(qk_norm=False)  # qkv projection with a bias: addmm with a 1-D bias
    expected, _, _, _ = ph.run_attention(model, compiled=False)
    got, history, code, _ = ph.run_attention(model, compiled=True)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert [counts[PASS] for counts in history] == [0, 1]  # extend graph, decode graph
    assert "torch.ops.radixc.small_batch_linear.default" in code


def test_switched_off_leaves_every_linear_to_aten(ph, on_cpu):
    torch.manual_seed(0)
    _, history, code, _ = ph.run_attention(
        ph.RopeAttention(qk_norm=False), compiled=True, small_batch_linear=False
    )
    assert all(PASS not in counts for counts in history)
    assert "small_batch_linear" not in code


# per model: (linear layers lowered, SiLU-and-multiply folded, residual adds and RMSNorms folded) in its decode
# graph. tiny-llama, per layer: qkv, o_proj and down_proj (their residuals folded into addmm), gate_up; then the LM
# head; each gate_up takes its MLP's activation, o_proj and down_proj the residual add after them, qkv, gate_up
# and the LM head the norm before them. tiny-qwen3.5 (3 GDN layers, 1 attention layer, zero-centered norms): each
# GDN layer's merged input and its output projection, the attention layer's qkv(+gate) and o_proj, four MLPs, the
# LM head; every layer's two residual adds and two norms, and the final norm, fold in.
EXPECTED_REWRITES = {
    "tiny-llama": (4 * 2 + 1, 2, 2 * 2 + 2 * 2 + 1),
    "tiny-qwen3.5": (2 * 3 + 2 + 2 * 4 + 1, 4, 2 * 4 + 2 * 4 + 1),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_REWRITES))
def test_compiled_model_decodes_through_the_kernel_with_eager_logits(ph, on_cpu, preset):
    model = build_preset(preset, dtype=torch.float32, seed=5)

    def run(compile: bool) -> list[torch.Tensor]:
        return ph.greedy_decode_logits(
            model, "native", compile, [[5, 9, 2, 7], [4, 6], [11, 12, 13]], steps=3
        )

    expected = run(compile=False)
    manager = radixc.passes.install()
    manager.history.clear()
    counters.clear()
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        got = run(compile=True)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    assert [(c[PASS], c[FUSED], c[NORMED]) for c in manager.history] == [(0, 0, 0), EXPECTED_REWRITES[preset]]
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2
