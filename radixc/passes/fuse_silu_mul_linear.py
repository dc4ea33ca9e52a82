"""Fusion: a gated MLP's SiLU-and-multiply folds into the epilogue of its gate-up GEMV.

After `lower_small_batch_linear`, a decode graph's gated MLP reads `silu(gate) * up`, where gate and up are the
two halves of one `radixc::small_batch_linear` (split at half its width). That is one pointwise kernel per layer
between the gate-up and down projections; `radixc::silu_mul_linear` computes the same in the GEMV's epilogue (a
program owns matching gate and up columns), so the activation costs no launch. SiLU is matched in the forms
the post-grad graph holds it: `aten.silu`, `x * sigmoid(x)`, or Inductor's `x / (1 + exp(-x))`, each with or
without a float32 round trip. Other activations (GELU) keep their kernel.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import radixc.ops.linear  # noqa: F401  (defines radixc::small_batch_linear and radixc::silu_mul_linear)
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    call,
    called_op,
    getitem_of,
    named_args,
    radixc_calls,
    skip_convert,
    used_only_inside,
)

aten = torch.ops.aten


def _is_one(value: object) -> bool:
    return isinstance(value, (int, float)) and value == 1


def silu_input(node: object, seen: list[torch.fx.Node] | None = None) -> torch.fx.Node | None:
    """x when node computes silu(x) (in one of its post-grad forms), else None; the nodes of the computation
    (x excluded) are appended to seen."""
    seen = [] if seen is None else seen
    node = skip_convert(node, seen)
    if not isinstance(node, torch.fx.Node):
        return None
    op, args = called_op(node), node.args
    x = None
    if op is aten.silu.default:
        x = args[0]
    elif op is aten.mul.Tensor:
        for a, b in (args, args[::-1]):
            if isinstance(b, torch.fx.Node) and called_op(b) is aten.sigmoid.default and b.args[0] is a:
                x = a
                seen.append(b)
    elif (
        op is aten.div.Tensor and isinstance(args[1], torch.fx.Node) and called_op(args[1]) is aten.add.Tensor
    ):
        numerator, (p, q) = args[0], args[1].args
        exp = p if _is_one(q) else q if _is_one(p) else None
        if isinstance(exp, torch.fx.Node) and called_op(exp) is aten.exp.default:
            neg = exp.args[0]
            if called_op(neg) is aten.neg.default and neg.args[0] is numerator:
                x = numerator
                seen.extend((args[1], exp, neg))
    seen.append(node)
    x = skip_convert(x, seen)
    return x if isinstance(x, torch.fx.Node) else None


def gate_and_up_halves(linear: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(gate, up): the getitems of the one split of linear's output into two halves of its last dim."""
    users = list(linear.users)
    width = linear.meta["val"].shape[-1]
    if len(users) != 1 or not isinstance(width, int) or width % 2:
        return None
    split, half = users[0], width // 2
    op = called_op(split)
    if op is aten.split.Tensor:
        sizes, dim = [split.args[1]] * 2, split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    elif op is aten.split_with_sizes.default:
        sizes, dim = list(split.args[1]), split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    else:
        return None
    if sizes != [half, half] or dim not in (-1, 1):
        return None
    halves = {}
    for item in split.users:
        got = getitem_of(item)
        if got is None or got[1] in halves:
            return None
        halves[got[1]] = item
    return (halves[0], halves[1]) if set(halves) == {0, 1} else None


def silu_mul_of(gate: torch.fx.Node, up: torch.fx.Node) -> torch.fx.Node | None:
    """The node computing silu(gate) * up, when it is the only use of up, of gate and of every step between."""
    if len(up.users) != 1:
        return None
    mul = next(iter(up.users))
    if called_op(mul) is not aten.mul.Tensor or len(mul.args) != 2:
        return None
    other = mul.args[0] if mul.args[1] is up else mul.args[1]
    steps: list[torch.fx.Node] = []
    if silu_input(other, steps) is not gate:
        return None
    return mul if used_only_inside([gate, *steps], mul) else None


class FuseSiluMulLinear(RadixPass):
    name = "fuse_silu_mul_linear"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for linear in radixc_calls(graph, "small_batch_linear"):
            halves = gate_and_up_halves(linear)
            mul = silu_mul_of(*halves) if halves is not None else None
            if mul is None or not self._same_result(linear, mul):
                continue
            with graph.inserting_before(mul):
                fused = call(
                    graph, torch.ops.radixc.silu_mul_linear.default, named_args(linear), mul.meta["val"], mul
                )
            mul.replace_all_uses_with(fused)
            count += 1
        return count

    @staticmethod
    def _same_result(linear: torch.fx.Node, mul: torch.fx.Node) -> bool:
        """The product keeps the linear layer's dtype and is contiguous, as the fused op's output is."""
        product, val = linear.meta["val"], mul.meta["val"]
        return val.dtype == product.dtype and val.dim() == 2 and statically_known_true(val.stride(-1) == 1)
