"""The memory floor of a decode step: the bytes it must move divided by the device's measured copy bandwidth.

A decode step reads every weight once, the K/V of each request's context, and reads and rewrites the GDN state
of hybrid models; no kernel can beat moving those bytes at copy speed, so measured / floor says how far a step
is from memory-bound. For MoE models every expert is counted, which overstates the floor at small batches.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from radixc.cache_spec import KVCacheSpec
from radixc.engine.config import gdn_state_bytes
from radixc.tools.bench_timing import median, timed

COPY_BYTES = 256 << 20  # well past any CPU's last-level cache and a GPU's L2


@dataclasses.dataclass(frozen=True)
class DecodeFloor:
    """Bytes one decode step of a batch must move, and the time that takes at copy bandwidth."""

    weight_bytes: int
    state_bytes: int
    bandwidth_bytes_per_s: float

    @property
    def seconds(self) -> float:
        return (self.weight_bytes + self.state_bytes) / self.bandwidth_bytes_per_s


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """Bytes per second of a large copy within the device, read and written bytes both counted (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults and allocator growth are not bandwidth
    seconds = [timed(lambda: dst.copy_(src), device)[1] for _ in range(repeats)]
    return 2 * nbytes / median(seconds)


def kv_bytes_per_token(spec: KVCacheSpec, dtype: torch.dtype) -> int:
    """K and V bytes one token occupies over all KV-cached layers."""
    return len(spec.full_attention_layer_ids) * _kv_bytes_per_layer_token(spec, dtype)


def _kv_bytes_per_layer_token(spec: KVCacheSpec, dtype: torch.dtype) -> int:
    return spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * dtype.itemsize


def weight_bytes(model: nn.Module, batch_size: int) -> int:
    """Parameter bytes a decode step of batch_size reads: every weight once (tied ones once), except input
    embedding tables that are not the LM head, of which only the looked-up rows are read."""
    head = getattr(model, "lm_head_weight", None)
    lookups = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding) and (head is None or m.weight is not head)
    }
    total = 0
    for param in model.parameters():  # yields a shared parameter once
        if id(param) in lookups:
            total += min(batch_size, param.shape[0]) * (param.nbytes // param.shape[0])
        else:
            total += param.nbytes
    return total


def state_bytes(spec: KVCacheSpec, dtype: torch.dtype, context_lens: list[int]) -> int:
    """Cache bytes a decode step moves for requests holding context_lens tokens (the new one included): K/V
    read per attention layer (sliding layers: their window), GDN conv and recurrent state read and written."""
    per_layer = _kv_bytes_per_layer_token(spec, dtype)
    total = 0
    for layer in spec.full_attention_layer_ids:
        window = (
            spec.sliding_window if layer in spec.sliding_window_layer_ids and spec.sliding_window else None
        )
        total += sum(min(n, window) if window else n for n in context_lens) * per_layer
    return total + 2 * len(context_lens) * gdn_state_bytes(spec, dtype)
