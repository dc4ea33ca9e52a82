"""Fusion: a decode GEMV whose only use widens it (the LM head's `.float()`) writes the wide dtype itself.

The models compute float32 logits as `F.linear(hidden, weight).float()`: after `lower_small_batch_linear` a
`small_batch_linear` in the model's dtype, then Inductor's cast kernel, which reads the logits and writes them
twice as wide (llama-1b at 32 rows: 25 MB, 20 µs on an H200, the step's slowest kernel for its bytes). With
`out_dtype` the GEMV rounds its float32 product to the model's dtype, as the unfused graph does, and stores it
widened: the same values, one launch and one read of the logits fewer. Any decode GEMV read only through such a
cast folds it the same way (Gemma 2's o_proj and down_proj, read by their float32 post-norms).
"""

from __future__ import annotations

import torch

import radixc.ops.linear  # noqa: F401  (defines radixc::small_batch_linear)
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import called_op, named_args, radixc_calls, rewrite_call


def widening_cast(linear: torch.fx.Node) -> tuple[torch.fx.Node, torch.dtype] | None:
    """(cast, dtype) when linear's only use converts it to a wider floating dtype."""
    users = list(linear.users)
    if len(users) != 1 or called_op(users[0]) is not torch.ops.prims.convert_element_type.default:
        return None
    cast, dtype = users[0], users[0].args[1]
    source = linear.meta["val"].dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize <= source.itemsize:
        return None
    return cast, dtype


class FuseLinearCast(RadixPass):
    name = "fuse_linear_cast"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for linear in radixc_calls(graph, "small_batch_linear"):
            args = named_args(linear)
            found = widening_cast(linear) if args.get("out_dtype") is None else None
            if found is None:
                continue
            cast, dtype = found
            rewrite_call(linear, {**args, "out_dtype": dtype})
            linear.meta["val"] = cast.meta["val"]
            cast.replace_all_uses_with(linear)
            graph.erase_node(cast)
            count += 1
        return count
