"""The layer-boundary fusion: a residual add after a decode GEMV op moves into its epilogue, and an RMSNorm (either
form of the reference) that feeds only such an op into its prologue, with the same results; a norm with another
use, something that only looks like one, or a residual computed after the product, stays.
Graphs are traced with Inductor's decompositions (as post-grad graphs are); the ops run the Triton kernel on the
GPU, or under the interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

import radixc.ops.linear  # noqa: F401  (the ops)
from radixc.ops.norm import rms_norm_reference
from radixc.passes.fuse_rms_norm_linear import FuseRMSNormLinear, rms_norm_of
from radixc.passes.graph_utils import named_args, radixc_calls

pytestmark = pytest.mark.triton

HIDDEN, OUT = 48, 40
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def scaled_norm_linear(x, norm_weight, weight):
    return torch.ops.radixc.small_batch_linear(rms_norm_reference(x, norm_weight, EPS, False), weight, None)


def zero_centered_norm_linear(x, norm_weight, weight):
    return torch.ops.radixc.small_batch_linear(rms_norm_reference(x, norm_weight, EPS, True), weight, None)


def norm_gated_linear(x, norm_weight, weight):
    return torch.ops.radixc.silu_mul_linear(rms_norm_reference(x, norm_weight, EPS, False), weight, None)


def norm_feeding_two(x, norm_weight, weight):
    normed = rms_norm_reference(x, norm_weight, EPS, False)
    return torch.ops.radixc.small_batch_linear(normed, weight, None), normed


def mean_not_squared(x, norm_weight, weight):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.abs().mean(-1, keepdim=True) + EPS)
    return torch.ops.radixc.small_batch_linear(norm_weight * normed.to(x.dtype), weight, None)


def _trace(fn, dtype: torch.dtype, rows: int = 3):
    gen = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, HIDDEN, generator=gen)).to(DEVICE, dtype)
    norm_weight = (torch.rand(HIDDEN, generator=gen) + 0.5).to(DEVICE, dtype)
    weight = (torch.randn(2 * OUT, HIDDEN, generator=gen) / HIDDEN**0.5).to(DEVICE, dtype)
    return make_fx(fn, decomposition_table=select_decomp_table())(x, norm_weight, weight), (
        x,
        norm_weight,
        weight,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(
    "fn", [scaled_norm_linear, zero_centered_norm_linear, norm_gated_linear], ids=lambda fn: fn.__name__
)
def test_each_norm_form_folds_into_the_op_with_the_same_result(fn, dtype):
    graph_module, inputs = _trace(fn, dtype)
    expected = graph_module(*inputs)
    assert FuseRMSNormLinear()(graph_module.graph) == 1
    graph_module.recompile()
    (linear,) = radixc_calls(graph_module.graph)
    args = named_args(linear)
    assert args["x"].op == "placeholder" and args["norm_eps"] == EPS
    assert args["norm_zero_centered"] == (fn is zero_centered_norm_linear)
    assert [n.target for n in graph_module.graph.nodes if n.op == "call_function"] == [linear.target]
    tolerance = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(graph_module(*inputs), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("fn", [norm_feeding_two, mean_not_squared], ids=lambda fn: fn.__name__)
def test_a_norm_with_another_use_or_a_lookalike_stays(fn):
    graph_module, _ = _trace(fn, torch.float16)
    assert FuseRMSNormLinear()(graph_module.graph) == 0
    assert all(named_args(n).get("norm_weight") is None for n in radixc_calls(graph_module.graph))


def test_rms_norm_of_reads_eps_and_form():
    graph_module, _ = _trace(zero_centered_norm_linear, torch.float16)
    (linear,) = radixc_calls(graph_module.graph)
    norm = rms_norm_of(named_args(linear)["x"])
    assert norm is not None and norm.eps == EPS and norm.zero_centered
    assert norm.x.op == "placeholder" and norm.weight.op == "placeholder"


def linear_plus_residual(x, residual, weight):
    return residual + torch.ops.radixc.small_batch_linear(x, weight, None)


def residual_computed_after(x, residual, weight):
    product = torch.ops.radixc.small_batch_linear(x, weight, None)
    return product + residual * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_a_residual_add_moves_into_the_epilogue(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, HIDDEN, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(3, OUT, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(OUT, HIDDEN, generator=gen) / HIDDEN**0.5).to(DEVICE, dtype)
    graph_module = make_fx(linear_plus_residual, decomposition_table=select_decomp_table())(
        x, residual, weight
    )
    expected = graph_module(x, residual, weight)
    assert FuseRMSNormLinear()(graph_module.graph) == 1
    graph_module.recompile()
    (linear,) = radixc_calls(graph_module.graph)
    assert named_args(linear)["residual"].op == "placeholder"
    assert [n for n in graph_module.graph.nodes if n.op == "call_function"] == [linear]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(graph_module(x, residual, weight), expected, atol=tolerance, rtol=tolerance)

    late = make_fx(residual_computed_after, decomposition_table=select_decomp_table())(x, residual, weight)
    assert FuseRMSNormLinear()(late.graph) == 0
