"""Fusion: per-head q/k RMSNorm (Qwen3-style `radixc::rms_norm`) folds into the rotary embedding after it.

`rotary_embedding(positions, rms_norm(q), rms_norm(k))`, each norm used only there and both with the same eps and
scaling, becomes `radixc::qk_norm_rope`. Written as an Inductor pattern; the rope + KV-store fusion that runs next
then takes the norm weights into its one kernel.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import (
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

from radixc.ops import rotary  # noqa: F401  (defines the rotary, rms_norm and qk_norm_rope ops matched here)
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import copy_provenance

_PATTERNS = PatternMatcherPass()


def _per_head_norm(name: str) -> CallFunction:
    # eps and zero_centered share one KeywordArg name: the matcher requires both norms to agree on them
    return CallFunction(
        torch.ops.radixc.rms_norm.default,
        KeywordArg(name),
        KeywordArg(f"{name}_norm_weight"),
        KeywordArg("norm_eps"),
        KeywordArg("norm_zero_centered"),
        _users=1,
    )


@register_graph_pattern(
    CallFunction(
        torch.ops.radixc.rotary_embedding.default,
        KeywordArg("positions"),
        _per_head_norm("q"),
        _per_head_norm("k"),
        KeywordArg("cos_sin_cache"),
        KeywordArg("head_size"),
        KeywordArg("is_neox"),
    ),
    pass_dict=_PATTERNS,
)
def _fuse(
    match: Match,
    positions,
    q,
    q_norm_weight,
    norm_eps,
    norm_zero_centered,
    k,
    k_norm_weight,
    cos_sin_cache,
    head_size,
    is_neox,
) -> None:
    graph, rope = match.graph, match.output_node()
    with graph.inserting_before(rope):
        fused = graph.call_function(
            torch.ops.radixc.qk_norm_rope.default,
            (
                positions,
                q,
                k,
                q_norm_weight,
                k_norm_weight,
                cos_sin_cache,
                head_size,
                is_neox,
                norm_eps,
                norm_zero_centered,
            ),
        )
    fused.meta["val"] = rope.meta["val"]
    copy_provenance(rope, fused)
    rope.replace_all_uses_with(fused)
    match.erase_nodes()


class FuseQKNormRope(RadixPass):
    name = "fuse_qk_norm_rope"

    def apply(self, graph: torch.fx.Graph) -> int:
        return _PATTERNS.apply(graph)
