"""The gated-activation fusion: `silu(gate) * up` over the halves of a `radixc::small_batch_linear` becomes one
`radixc::silu_mul_linear`, in each form the post-grad graph holds SiLU, and nothing else does. Graphs are traced
with Inductor's decompositions (as post-grad graphs are); the fused op runs the Triton kernel on the GPU, or under
the interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

import radixc.ops.linear  # noqa: F401  (the ops)
from radixc.passes.fuse_silu_mul_linear import FuseSiluMulLinear, silu_input
from radixc.passes.graph_utils import radixc_calls

pytestmark = pytest.mark.triton

HIDDEN, INTERMEDIATE = 24, 40
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gate_up(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.radixc.small_batch_linear(x, weight, None).split(INTERMEDIATE, -1)


def silu_mul(x, weight):
    gate, up = _gate_up(x, weight)
    return F.silu(gate) * up


def up_times_sigmoid_form(x, weight):
    gate, up = _gate_up(x, weight)
    return up * (gate * torch.sigmoid(gate))


def chunked(x, weight):
    gate, up = torch.ops.radixc.small_batch_linear(x, weight, None).chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_mul(x, weight):
    gate, up = _gate_up(x, weight)
    return F.gelu(gate) * up


def gate_used_twice(x, weight):
    gate, up = _gate_up(x, weight)
    return F.silu(gate) * up + gate


def uneven_split(x, weight):
    gate, up = torch.ops.radixc.small_batch_linear(x, weight, None).split(
        [INTERMEDIATE - 8, INTERMEDIATE + 8], -1
    )
    return F.silu(gate) * up[:, :-16]


def float32_product(x, weight):
    gate, up = _gate_up(x, weight)
    return F.silu(gate.float()) * up.float()


def _trace(fn, dtype: torch.dtype, rows: int = 3):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(2 * INTERMEDIATE, HIDDEN, generator=gen) / HIDDEN**0.5).to(DEVICE, dtype)
    graph_module = make_fx(fn, decomposition_table=select_decomp_table())(x, weight)
    return graph_module, x, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("fn", [silu_mul, up_times_sigmoid_form, chunked], ids=lambda fn: fn.__name__)
def test_each_silu_form_fuses_with_the_same_result(fn, dtype):
    graph_module, x, weight = _trace(fn, dtype)
    expected = graph_module(x, weight)
    assert FuseSiluMulLinear()(graph_module.graph) == 1
    graph_module.recompile()
    assert [n.target for n in radixc_calls(graph_module.graph)] == [torch.ops.radixc.silu_mul_linear.default]
    got = graph_module(x, weight)
    assert got.dtype == dtype and got.shape == (3, INTERMEDIATE)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    "fn", [gelu_mul, gate_used_twice, uneven_split, float32_product], ids=lambda fn: fn.__name__
)
def test_other_activations_and_shapes_stay_unfused(fn):
    graph_module, _, _ = _trace(fn, torch.float16)
    assert FuseSiluMulLinear()(graph_module.graph) == 0
    assert not radixc_calls(graph_module.graph, "silu_mul_linear")


def test_silu_input_is_none_for_a_sigmoid_of_another_tensor():
    def fn(a, b):
        return a * torch.sigmoid(b)

    graph = make_fx(fn)(torch.randn(4), torch.randn(4)).graph
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    assert silu_input(output) is None


def test_the_fused_op_rejects_a_weight_without_two_halves():
    with pytest.raises(ValueError, match="gate and up halves, got 5 rows"):
        torch.ops.radixc.silu_mul_linear(
            torch.randn(2, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE), None
        )
