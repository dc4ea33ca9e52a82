"""Lowering pass: each generic radixc op node becomes the kernel op of its backend and forward mode.

The backend and mode are constants of the node, so the choice is made here, at compile time; for hybrid models
full-attention and GDN nodes lower independently and no backend dispatch is left in the compiled code.
"""

from __future__ import annotations

import torch

from radixc.ops.library import GENERIC_CONSTANTS, OP_KINDS, resolve_kernel
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import called_op, radixc_nodes, set_called_op


class LowerRadixOps(RadixPass):
    name = "lower_radixc_ops"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for node in radixc_nodes(graph):
            kind = called_op(node)._opname
            if kind not in OP_KINDS:
                continue
            kernel = resolve_kernel(kind, node.kwargs["backend"], node.kwargs["forward_mode"])
            node.meta["radixc_lowered_from"] = f"radixc.{kind}"
            set_called_op(node, kernel, drop_kwargs=GENERIC_CONSTANTS)
            count += 1
        return count
