"""Partition marking: find the radixc kernel calls that must run outside CUDA graphs.

The marking itself is the `cudagraph_unsafe` tag the kernel ops carry (host-sized native kernels, per-batch
planning ops); Inductor's graph partitioning (`torch._inductor.config.graph_partition`) cuts the graph around
them so that everything else is captured. This pass records each such node in `node.meta["radixc_partition"]`
and counts them, so radixc-inspect and the tests can show where the cuts fall.
"""

from __future__ import annotations

import torch

from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import called_op, is_radixc_op


def runs_outside_cudagraph(op: torch._ops.OpOverload | None) -> bool:
    return is_radixc_op(op) and torch.Tag.cudagraph_unsafe in op.tags


class MarkCudagraphPartitions(RadixPass):
    name = "mark_cudagraph_partitions"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for node in graph.nodes:
            if runs_outside_cudagraph(called_op(node)):
                node.meta["radixc_partition"] = "outside_cudagraph"
                count += 1
        return count

    def __call__(self, graph: torch.fx.Graph) -> int:
        return self.apply(graph)  # annotates only: no dead-code elimination or lint needed
