"""Fusion: a decoder layer boundary's residual add and RMSNorm fold into the decode GEMVs around them.

A decoder layer's norms each feed one projection (qkv, gate-up, the LM head), and the residual add before each
follows a projection (o_proj, down_proj: `small_batch_linear` then `add`). Inductor makes the add and the norm
one reduction kernel: 33 launches of llama-1b's step. Here the add moves into the GEMV before it (`residual`,
added in its epilogue) and the norm's input h, weight and eps into the op after it (`norm_weight`, `norm_eps`,
`norm_zero_centered`), whose kernel normalises x in the pass that reads it for the product. The norm is matched
in the two forms of radixc.ops.norm.rms_norm_reference (weight times the rounded row, Llama; (1 + weight) in
float32, Gemma and Qwen3.5), each with or without the float32 round trip of a half-precision model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import radixc.ops.linear  # noqa: F401  (defines the linear ops matched here)
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


@dataclasses.dataclass
class MatchedNorm:
    """An RMSNorm found in a graph: its input, weight, eps and form, and the nodes that compute it."""

    x: torch.fx.Node
    weight: torch.fx.Node
    eps: float
    zero_centered: bool
    steps: list[torch.fx.Node]


def _operands(node: torch.fx.Node, op) -> tuple | None:
    """node's two arguments when it calls op with two, else None."""
    if isinstance(node, torch.fx.Node) and called_op(node) is op and len(node.args) == 2:
        return node.args
    return None


def _inverse_rms(node: object, x: object, steps: list[torch.fx.Node]) -> float | None:
    """eps when node is rsqrt(mean(x ** 2, [-1], keepdim) + eps), else None."""
    if not isinstance(node, torch.fx.Node) or called_op(node) is not aten.rsqrt.default:
        return None
    added = _operands(node.args[0], aten.add.Tensor)
    if added is None or not isinstance(added[1], (int, float)):
        return None
    mean = added[0]
    if (
        called_op(mean) is not aten.mean.dim
        or list(mean.args[1]) not in ([-1], [1])
        or mean.args[2:] != (True,)
    ):
        return None
    square = mean.args[0]
    if _operands(square, aten.pow.Tensor_Scalar) != (x, 2):
        return None
    steps.extend((node, node.args[0], mean, square))
    return float(added[1])


def _normalized(node: object, steps: list[torch.fx.Node]) -> tuple[torch.fx.Node, float] | None:
    """(x, eps) when node is x * rsqrt(mean(x ** 2) + eps) (x taken through a float32 conversion)."""
    pair = _operands(node, aten.mul.Tensor)
    if pair is None:
        return None
    for x, inverse in (pair, pair[::-1]):
        eps = _inverse_rms(inverse, x, steps)
        if eps is not None:
            steps.append(node)
            source = skip_convert(x, steps)
            return (source, eps) if isinstance(source, torch.fx.Node) else None
    return None


def rms_norm_of(node: object) -> MatchedNorm | None:
    """The RMSNorm node computes, in either of the reference's forms, else None."""
    steps: list[torch.fx.Node] = []
    top = skip_convert(node, steps)
    pair = _operands(top, aten.mul.Tensor)
    if pair is None:
        return None
    steps.append(top)
    for a, b in (pair, pair[::-1]):
        # zero-centered: normed * (weight + 1) in float32, then rounded
        plus_one = _operands(b, aten.add.Tensor)
        if plus_one is not None and plus_one[1] == 1 and (found := _normalized(a, steps)) is not None:
            weight = skip_convert(plus_one[0], steps)
            steps.append(b)
            return MatchedNorm(found[0], weight, found[1], True, steps)
        # scaled: weight * normed rounded to the input dtype
        found = _normalized(skip_convert(b, steps), steps)
        if found is not None:
            return MatchedNorm(found[0], a, found[1], False, steps)
    return None


def _fits(norm: MatchedNorm, normed: torch.fx.Node) -> bool:
    """A norm the kernel computes: over the last dim of unit-stride 2-D rows, in the rows' dtype, with a 1-D
    weight of that width."""
    x, weight, out = norm.x.meta.get("val"), norm.weight.meta.get("val"), normed.meta.get("val")
    if x is None or weight is None or out is None or x.dim() != 2 or weight.dim() != 1:
        return False
    return (
        out.dtype == x.dtype
        and statically_known_true(x.stride(-1) == 1)
        and statically_known_true(weight.shape[0] == x.shape[1])
    )


def residual_add_of(
    linear: torch.fx.Node, order: dict[torch.fx.Node, int]
) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(add, residual) when linear's only use adds a tensor computed before linear, of its output's shape, dtype
    and unit-stride rows (`order`: each node's position in the graph)."""
    users = list(linear.users)
    pair = _operands(users[0], aten.add.Tensor) if len(users) == 1 else None
    if pair is None or named_args(linear).get("residual") is not None:
        return None
    residual = pair[1] if pair[0] is linear else pair[0]
    val, out = getattr(residual, "meta", {}).get("val"), linear.meta["val"]
    if (
        order.get(residual, len(order)) > order[linear]
        or val is None
        or val.dtype != out.dtype
        or val.dim() != 2
    ):
        return None
    same_shape = all(statically_known_true(a == b) for a, b in zip(val.shape, out.shape, strict=True))
    return (users[0], residual) if same_shape and statically_known_true(val.stride(-1) == 1) else None


class FuseRMSNormLinear(RadixPass):
    name = "fuse_rms_norm_linear"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        order = {node: index for index, node in enumerate(graph.nodes)}
        for linear in radixc_calls(graph, "small_batch_linear"):
            found = residual_add_of(linear, order)
            if found is not None:
                add, residual = found
                rewrite_call(linear, {**named_args(linear), "residual": residual})
                linear.meta["val"] = add.meta["val"]
                add.replace_all_uses_with(linear)
                count += 1
        linears = radixc_calls(graph, "small_batch_linear") + radixc_calls(graph, "silu_mul_linear")
        for linear in linears:
            args = named_args(linear)
            if args.get("norm_weight") is not None:
                continue
            normed = args["x"]
            norm = rms_norm_of(normed)
            if norm is None or not _fits(norm, normed) or not used_only_inside(norm.steps, linear):
                continue
            args.update(
                x=norm.x, norm_weight=norm.weight, norm_eps=norm.eps, norm_zero_centered=norm.zero_centered
            )
            rewrite_call(linear, args)
            count += 1
        return count
