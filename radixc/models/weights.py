"""How checkpoint tensors map onto model parameters: one WeightSpec per Hugging Face tensor name.

A module whose parameters do not match the checkpoint one to one (a fused projection, stacked experts, a
reordered layout) defines `checkpoint_specs(prefix, names)`; every other parameter maps to the tensor of the
same name. The loader checks the checkpoint against these specs: names, shapes and completeness.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint or config radixc cannot load: unknown architecture, bad, missing or extra tensor."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's part of a full tensor of `full_shape`: the (start, length) ranges along `dim`, concatenated."""

    dim: int
    full_shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(length for _, length in self.ranges)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `full` (a tensor of `full_shape`)."""
        parts = [full.narrow(self.dim, start, length) for start, length in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)

    def region(self) -> tuple[slice, ...]:
        """Where `take`'s result goes in the parameter: its first `length` entries along `dim` (the rest of a
        padded vocabulary shard stays zero)."""
        return (slice(None),) * self.dim + (slice(0, self.length),)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where one checkpoint tensor goes: into `param` (or its region `index`), possibly reordered first."""

    param: str
    shape: tuple[int, ...]
    # region of the parameter, e.g. (slice(0, 256),) for one part of a fused projection, (expert,) for a stack
    index: tuple = ()
    # checkpoint dim-0 gather applied before the copy (reorders a fused Hugging Face layout into ours)
    rows: torch.Tensor | None = None
    # swap the checkpoint tensor's last two dims before the copy (we store it transposed)
    transpose: bool = False
    # this rank's part of the (reordered, transposed) checkpoint tensor under tensor parallelism
    shard: Shard | None = None


def interleaved_rows(num_groups: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Rows of a projection stored as `num_groups` groups of [part_0 | part_1 | ...] (sizes per group), in
    the order [part_0 of every group | part_1 of every group | ...]."""
    grouped = torch.arange(num_groups * sum(sizes)).view(num_groups, sum(sizes))
    return torch.cat([part.reshape(-1) for part in grouped.split(sizes, dim=1)])


def set_shard(param: torch.Tensor, shard: Shard) -> None:
    """Mark `param` as holding `shard` of a full weight (read by the loader and the random init)."""
    param.shard = shard


def param_shard(param: torch.Tensor) -> Shard | None:
    """The shard a parameter holds, None when it holds the whole weight."""
    return getattr(param, "shard", None)


def identity_specs(module: nn.Module, prefix: str) -> dict[str, WeightSpec]:
    """Specs for the module's own (non-recursive) parameters, each loaded from the tensor of the same name
    (a sharded parameter: from its rows of that tensor)."""
    specs = {}
    for name, param in module.named_parameters(recurse=False):
        shard = param_shard(param)
        if shard is None:
            specs[prefix + name] = WeightSpec(prefix + name, tuple(param.shape))
        else:
            specs[prefix + name] = WeightSpec(prefix + name, shard.full_shape, shard.region(), shard=shard)
    return specs


def collect_weight_specs(model: nn.Module, names: Set[str]) -> dict[str, WeightSpec]:
    """A model's specs keyed by checkpoint name; `names` (the checkpoint's) lets modules pick a layout."""
    specs: dict[str, WeightSpec] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        own = getattr(module, "checkpoint_specs", None)
        if own is not None:
            specs.update(own(prefix, names))
            return
        specs.update(identity_specs(module, prefix))
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.")

    visit(model, "")
    params = dict(model.named_parameters())
    unclaimed = set(params) - {spec.param for spec in specs.values()}
    if unclaimed:
        raise RuntimeError(
            f"{type(model).__name__}: parameters no checkpoint tensor fills: {sorted(unclaimed)}"
        )
    return specs


def parent_prefix(prefix: str) -> str:
    """'model.layers.0.mlp.gate_up_proj.' -> 'model.layers.0.mlp.' (where a fused module's parts live)."""
    return prefix[: prefix.rstrip(".").rfind(".") + 1]
