"""Fusion: a gated attention's output gate folds into the prologue of its o_proj GEMV.

Qwen3.5 and Qwen3-Next multiply each attention layer's output by sigmoid(gate), a slice of the qkv projection,
before o_proj: after `lower_small_batch_linear`, one Inductor kernel per attention layer between two radixc
kernels, and outside their programmatic-dependent-launch chain. With `input_gate` the decode GEMV multiplies x by
sigmoid(gate) as it loads x (in float32, rounded once to the model's dtype as Inductor's kernel rounds it), so
the gate costs no launch. Matched: `small_batch_linear(x=a * sigmoid(g))` (either operand order, a dtype round
trip around sigmoid allowed) with a and g of x's shape and dtype and unit-stride rows, the product and the
sigmoid used by nothing else; not where the op already normalises x.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import radixc.ops.linear  # noqa: F401  (defines radixc::small_batch_linear)
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    called_op,
    named_args,
    radixc_calls,
    rewrite_call,
    skip_convert,
    used_only_inside,
)

aten = torch.ops.aten


def sigmoid_gated(x: object) -> tuple[torch.fx.Node, torch.fx.Node, list[torch.fx.Node]] | None:
    """(a, g, the nodes of the gate computation) when x computes a * sigmoid(g), else None."""
    if not isinstance(x, torch.fx.Node) or called_op(x) is not aten.mul.Tensor or len(x.args) != 2:
        return None
    for a, other in (x.args, x.args[::-1]):
        steps: list[torch.fx.Node] = []
        sigmoid = skip_convert(other, steps)
        if isinstance(sigmoid, torch.fx.Node) and called_op(sigmoid) is aten.sigmoid.default:
            steps.append(sigmoid)
            gate = skip_convert(sigmoid.args[0], steps)
            if isinstance(a, torch.fx.Node) and isinstance(gate, torch.fx.Node):
                return a, gate, steps
    return None


def _like_x(node: torch.fx.Node, x: torch.Tensor) -> bool:
    """node's value has x's shape and dtype and unit-stride rows (what the kernel's prologue loads)."""
    val = node.meta.get("val")
    return (
        isinstance(val, torch.Tensor)
        and val.dtype == x.dtype
        and val.dim() == 2
        and all(statically_known_true(p == q) for p, q in zip(val.shape, x.shape))
        and statically_known_true(val.stride(-1) == 1)
    )


class FuseInputGateLinear(RadixPass):
    name = "fuse_input_gate_linear"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for linear in radixc_calls(graph, "small_batch_linear"):
            args = named_args(linear)
            x = args["x"]
            if args.get("norm_weight") is not None or args.get("input_gate") is not None:
                continue
            found = sigmoid_gated(x)
            if found is None or set(x.users) != {linear} or not used_only_inside(found[2], x):
                continue
            a, gate, _ = found
            if not (_like_x(a, x.meta["val"]) and _like_x(gate, x.meta["val"])):
                continue
            rewrite_call(linear, {**args, "x": a, "input_gate": gate})
            count += 1
        return count
