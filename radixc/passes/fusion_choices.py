"""Inductor fusion choices that count a buffer of unbacked size at Inductor's fallback size instead of as 0 bytes.

The token dim of every radixc graph is unbacked (one graph serves every batch). Inductor scores a fusion by the
bytes the two nodes share, and counts a buffer of unbacked size as 0 bytes, so it sees "no shared data" between
a reduction and the pointwise after it: each RMSNorm became two kernels (the sum of squares, then the scaling),
~1.5 µs of launch each in a decode step. These choices score such shared buffers at
`unbacked_symint_fallback` rows, the size Inductor assumes for unbacked dims elsewhere, so they fuse as they
would with a known size. Buffers the two nodes do not share still score 0.
"""

from __future__ import annotations

import hashlib
import inspect
import sys

import torch._inductor.config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.utils import get_dtype_size
from torch._inductor.virtualized import V


def shared_bytes_at_fallback(node1, node2) -> int:
    """Bytes of the buffers (same buffer, same indexing) both nodes read or write, unbacked sizes taken at the
    fallback size."""
    common = (node1.read_writes.reads | node1.read_writes.writes) & (
        node2.read_writes.reads | node2.read_writes.writes
    )
    total = 0
    for dep in common:
        try:
            numel = dep.get_numel()
            itemsize = get_dtype_size(V.graph.get_dtype(dep.name))
        except (NotImplementedError, KeyError):  # no layout (a mutation marker) or no such buffer
            continue
        total += (
            V.graph.sizevars.optimization_hint(numel, fallback=inductor_config.unbacked_symint_fallback)
            * itemsize
        )
    return total


class UnbackedSizeFusionChoices(InductorChoices):
    """InductorChoices whose fusion checks re-score a 0-byte sharing with unbacked sizes at the fallback size."""

    @staticmethod
    def can_fuse(scheduler, node1, node2, shared_data_score: int) -> bool:
        score = shared_data_score or shared_bytes_at_fallback(node1, node2)
        return InductorChoices.can_fuse(scheduler, node1, node2, score)

    @staticmethod
    def can_fuse_horizontal(scheduler, node1, node2, shared_data_score: int) -> bool:
        score = shared_data_score or shared_bytes_at_fallback(node1, node2)
        return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, score)

    def uuid(self) -> str:
        """Hash of this module's source: Inductor's FX graph cache key includes it (torch ≥ 2.12 asks for it)."""
        return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()


def install_fusion_choices() -> bool:
    """Make these choices Inductor's unless the user set a choices class of their own; True when they are in use."""
    current = inductor_config.inductor_choices_class
    if current is None:
        inductor_config.inductor_choices_class = UnbackedSizeFusionChoices
        return True
    return current is UnbackedSizeFusionChoices
