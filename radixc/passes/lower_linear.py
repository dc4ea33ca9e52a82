"""Decode linear layers to `radixc::small_batch_linear`, which runs the Triton GEMV kernel for few rows.

A decode step multiplies each weight by a handful of rows, a memory-bound shape for which cuBLAS's choices waste
up to 10x the time of the weight's bytes. In a graph whose radixc ops are all in decode mode, each `mm` (and
`addmm`, with a bias or a folded residual add) whose right side is a transposed contiguous weight becomes the
op; the op keeps cuBLAS for
batches above its row limit. Only CUDA graphs are rewritten (on the CPU the Triton kernel only runs in the
interpreter; the tests widen `device_types` for that).
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import radixc.ops.linear  # noqa: F401  (defines radixc::small_batch_linear)
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import aten_call, call, called_op, radixc_nodes

_TRANSPOSES = (torch.ops.aten.permute.default, torch.ops.aten.t.default)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_decode_graph(graph: torch.fx.Graph) -> bool:
    """True when the graph's generic radixc ops (those that name a forward mode) are all decode."""
    modes = {n.kwargs.get("forward_mode") for n in radixc_nodes(graph)} - {None}
    return modes == {"decode"}


def transposed_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """w when node is `w.t()` / `w.permute(1, 0)` of a contiguous 2-D w, else None."""
    if not isinstance(node, torch.fx.Node) or called_op(node) not in _TRANSPOSES:
        return None
    if called_op(node) is torch.ops.aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    weight = node.args[0]
    val = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if val is None or val.dim() != 2 or not val.is_contiguous():
        return None
    return weight


class LowerSmallBatchLinear(RadixPass):
    name = "lower_small_batch_linear"
    device_types: tuple[str, ...] = (
        "cuda",
    )  # where the Triton kernel runs compiled (the CPU only interprets it)

    def apply(self, graph: torch.fx.Graph) -> int:
        if not is_decode_graph(graph):
            return 0
        count = 0
        for node in list(graph.nodes):
            op = called_op(node)
            if op is torch.ops.aten.mm.default:
                bias, x, weight_t = None, *node.args
            elif op is torch.ops.aten.addmm.default and not node.kwargs:
                bias, x, weight_t = node.args
            else:
                continue
            weight = transposed_weight(weight_t)
            if weight is None or not self._fits(x, weight, bias):
                continue
            # a 1-D bias is the kernel's; a 2-D one (a residual Inductor folded into addmm) is added after it
            added = bias if bias is not None and bias.meta["val"].dim() == 2 else None
            with graph.inserting_before(node):
                out = call(
                    graph,
                    torch.ops.radixc.small_batch_linear.default,
                    {"x": x, "weight": weight, "bias": None if added is not None else bias},
                    node.meta["val"],
                    node,
                )
                if added is not None:
                    out = aten_call(graph, torch.ops.aten.add.Tensor, added, out)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            count += 1
        return count

    def _fits(self, x: torch.fx.Node, weight: torch.fx.Node, bias: torch.fx.Node | None) -> bool:
        """The kernel's preconditions, known from the fake values: one device and dtype, unit-stride rows, and a
        bias of the weight's rows (1-D) or of the output's shape (2-D)."""
        x_val, w_val = x.meta.get("val"), weight.meta["val"]
        if x_val is None or x_val.dim() != 2 or x_val.device.type not in self.device_types:
            return False
        if x_val.dtype not in _DTYPES or w_val.dtype != x_val.dtype or w_val.device != x_val.device:
            return False
        if not statically_known_true(x_val.stride(-1) == 1):
            return False
        if bias is None:
            return True
        b_val = bias.meta.get("val") if isinstance(bias, torch.fx.Node) else None
        return b_val is not None and b_val.dim() in (1, 2) and b_val.dtype == x_val.dtype
