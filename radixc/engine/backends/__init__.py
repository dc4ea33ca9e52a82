"""Attention backends: one module each, registered by declaring them, and the choice of one for a model.

Adding a backend touches three files: its kernels under `radixc/ops/<backend>/`, its declaration in
`radixc/engine/backends/<backend>.py`, and the import below.
"""

from __future__ import annotations

import torch

from radixc.cache_spec import KVCacheSpec
from radixc.engine.backends.base import BACKENDS, AttentionBackend
from radixc.engine.backends.flashinfer import FlashInferBackend
from radixc.engine.backends.hybrid import HybridAttnBackend
from radixc.engine.backends.native import NativeBackend
from radixc.engine.backends.triton import TritonBackend

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "FlashInferBackend",
    "HybridAttnBackend",
    "NativeBackend",
    "TritonBackend",
    "available_backends",
    "choose_backend",
]


def available_backends(device: torch.device, spec: KVCacheSpec | None = None) -> list[str]:
    """Backends that run on `device` (and serve a model of cache spec `spec`), in "auto" order."""
    ranked = sorted(BACKENDS.values(), key=lambda cls: cls.auto_rank)
    return [
        cls.name
        for cls in ranked
        if cls.unavailable_reason(device) is None and (spec is None or cls.cache_spec_problem(spec) is None)
    ]


def choose_backend(name: str, device: torch.device, spec: KVCacheSpec) -> AttentionBackend:
    """The backend `name` ("auto" or a registered name) for a model of cache spec `spec` on `device`.

    "auto" takes the first available backend, except that off CUDA it takes native (the Triton interpreter is
    for tests). Hybrid models get HybridAttnBackend(full, GDN): the GDN role goes to the same backend when it has
    GDN kernels, else to the best available backend that has them.
    """
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}: choose 'auto' or one of {sorted(BACKENDS)} "
            f"(available on {device.type}: {available_backends(device, spec)})"
        )
    if name == "auto":
        candidates = [n for n in available_backends(device, spec) if device.type == "cuda" or n == "native"]
        if not candidates:
            raise RuntimeError(f"no attention backend runs on {device} (known: {sorted(BACKENDS)})")
        name = candidates[0]
    cls = BACKENDS[name]
    reason = cls.unavailable_reason(device) or cls.cache_spec_problem(spec)
    if reason is not None:
        raise ValueError(
            f"attention backend {name!r} is not available on {device}: {reason} "
            f"(available: {available_backends(device, spec)})"
        )
    full = cls()
    if not spec.gdn_layer_ids:
        return full
    if full.has_gdn():
        return HybridAttnBackend(full, full, spec.full_attention_layer_ids)
    gdn_name = next(n for n in available_backends(device) if BACKENDS[n].has_gdn())
    return HybridAttnBackend(full, BACKENDS[gdn_name](), spec.full_attention_layer_ids)
