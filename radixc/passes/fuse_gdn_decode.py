"""Fusion: a GDN layer's decode kernels, and the gated RMSNorm after them, become one kernel.

After lowering, a decode graph's GDN layer on the Triton backend is the conv + SiLU kernel op, a split of its
output into q, k and v, and the delta-rule kernel op; the models then apply a gated RMSNorm per v head,
norm(o) * weight * silu(z), which Inductor makes a kernel of its own: three launches per layer between the input
and output projections. `radixc::gdn_decode_step` (radixc.ops.triton.gdn_decode) does all of it in one, with the
norm where it is matched (either form of radixc.ops.norm.rms_norm_reference, on the rule's output seen per head,
times SiLU of a gate in any of its post-grad forms) and nothing else reads what it replaces; without a matched
norm it still fuses the conv and the rule. Only where one program holds a v head's state tile.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import radixc.ops.gdn_decode  # noqa: F401  (defines radixc::gdn_decode_step)
from radixc.ops.gdn_decode import fits_gdn_decode_step
from radixc.passes import fuse_rms_norm_linear, fuse_silu_mul_linear
from radixc.passes.base import RadixPass
from radixc.passes.fuse_rms_norm_linear import MatchedNorm, rms_norm_of
from radixc.passes.fuse_silu_mul_linear import silu_input
from radixc.passes.graph_utils import (
    aten_call,
    call,
    called_op,
    is_radixc_op,
    named_args,
    radixc_calls,
    skip_convert,
    skip_reshapes,
    split_of,
    used_only_inside,
)

aten = torch.ops.aten
_CONV, _RULE = "triton_causal_conv1d_silu_decode", "triton_gated_delta_rule_decode"
# how many uses deep below the rule's output a gated norm's last node may sit
_NORM_DEPTH = 12


@dataclasses.dataclass
class GatedNorm:
    """A gated RMSNorm over the rule's output: the node that ends it, its gate (2-D rows), norm and steps."""

    end: torch.fx.Node
    gate: torch.fx.Node
    norm: MatchedNorm
    steps: list[torch.fx.Node]


def conv_of_rule(rule: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(conv, split) when the rule's q, k and v are the three parts, in order, of a split of the conv kernel
    op's output that nothing else reads."""
    args = named_args(rule)
    split = split_of([args[name] for name in ("q", "k", "v")])
    if split is None:
        return None
    conv = split.args[0]
    if not is_radixc_op(called_op(conv), _CONV) or len(conv.users) != 1 or len(split.users) != 3:
        return None
    if any(list(args[name].users) != [rule] for name in ("q", "k", "v")):
        return None
    if named_args(conv)["gdn_slots"] is not args["gdn_slots"]:
        return None
    return conv, split


def gated_norm_of(node: object) -> GatedNorm | None:
    """The gated RMSNorm node computes, norm(x) * silu(gate) (rounded or not), else None; its steps leave the
    node itself out."""
    steps: list[torch.fx.Node] = []
    top = skip_convert(node, steps)
    if not isinstance(top, torch.fx.Node) or called_op(top) is not aten.mul.Tensor or len(top.args) != 2:
        return None
    for normed, gated in (top.args, top.args[::-1]):
        gate_steps: list[torch.fx.Node] = []
        gate = silu_input(gated, gate_steps)
        norm = rms_norm_of(normed) if gate is not None else None
        if norm is not None:
            inner = [step for step in (*steps, top, *gate_steps, *norm.steps) if step is not node]
            return GatedNorm(node, gate, norm, inner)
    return None


def _norm_after(rule: torch.fx.Node, head_v_dim: int, order: dict[torch.fx.Node, int]) -> GatedNorm | None:
    """The outermost gated RMSNorm over the rule's output per v head, when it is all that reads it."""
    view = next(iter(rule.users)) if len(rule.users) == 1 else None
    if view is None or skip_reshapes(view) is not rule:
        return None
    below, frontier = set(), [view]
    for _ in range(_NORM_DEPTH):
        frontier = [user for node in frontier for user in node.users if user not in below]
        below.update(frontier)
    for candidate in sorted(below, key=lambda node: order.get(node, -1), reverse=True):
        found = gated_norm_of(candidate)
        if found is None or found.norm.x is not view:
            continue
        x, weight, out = view.meta.get("val"), found.norm.weight.meta.get("val"), candidate.meta.get("val")
        gate_rows = skip_reshapes(found.gate)
        gate = gate_rows.meta.get("val")
        if x is None or weight is None or out is None or gate is None or gate.dim() != 2:
            continue
        if (
            x.dim() != 3
            or not statically_known_true(x.shape[-1] == head_v_dim)
            or tuple(weight.shape) != (head_v_dim,)
            or out.dtype != rule.meta["val"].dtype
            or not statically_known_true(gate.shape[1] == rule.meta["val"].shape[1])
            or not statically_known_true(gate.stride(-1) == 1)
        ):
            continue
        if used_only_inside([view, *found.steps], candidate):
            return GatedNorm(candidate, gate_rows, found.norm, found.steps)
    return None


class FuseGDNDecode(RadixPass):
    name = "fuse_gdn_decode"
    helper_modules = (fuse_rms_norm_linear, fuse_silu_mul_linear)

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        order = {node: index for index, node in enumerate(graph.nodes)}
        for rule in radixc_calls(graph, _RULE):
            rule_args = named_args(rule)
            if not fits_gdn_decode_step(rule_args["head_k_dim"], rule_args["head_v_dim"]):
                continue
            found = conv_of_rule(rule)
            if found is None:
                continue
            conv, split = found
            norm = _norm_after(rule, rule_args["head_v_dim"], order)
            conv_args = named_args(conv)
            kwargs = dict(
                mixed_qkv=conv_args["x"],
                conv_weight=conv_args["weight"],
                conv_state=conv_args["conv_state"],
                **{
                    name: rule_args[name] for name in ("a", "b", "A_log", "dt_bias", "ssm_state", "gdn_slots")
                },
                **{
                    name: rule_args[name]
                    for name in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")
                },
            )
            replaced = rule
            if norm is not None:
                replaced = norm.end
                kwargs.update(
                    gate=norm.gate,
                    norm_weight=norm.norm.weight,
                    norm_eps=norm.norm.eps,
                    norm_zero_centered=norm.norm.zero_centered,
                )
            with graph.inserting_before(replaced):
                fused = call(graph, torch.ops.radixc.gdn_decode_step.default, kwargs, rule.meta["val"], rule)
                result = fused
                if norm is not None:
                    heads = (-1, *replaced.meta["val"].shape[1:])
                    result = aten_call(graph, aten.reshape.default, fused, list(heads))
            replaced.replace_all_uses_with(result)
            # the old kernel ops write the states: dead-code elimination would keep them (and what reads them)
            dead = {conv, split, *split.users, rule, *rule.users, replaced}
            dead.update(norm.steps if norm is not None else ())
            for node in sorted(dead, key=lambda node: order.get(node, -1), reverse=True):
                graph.erase_node(node)
            count += 1
        return count
