"""Which attention backend serves a model on a device: a name the user gives, or the best available one."""

from __future__ import annotations

import os

import torch

from radixc.engine import backends
from radixc.engine.backends.base import AttentionBackend
from radixc.models.config import KVCacheSpec
from radixc.ops.library import kernel_backends

# backend name -> class name in radixc.engine.backends; "auto" tries them in this order (fastest first)
BACKEND_CLASSES = {"flashinfer": "FlashInferBackend", "triton": "TritonBackend", "native": "NativeBackend"}
_CUDA_ONLY = {"flashinfer", "triton"}


def available_backends(device: torch.device, kind: str = "attention") -> list[str]:
    """Backends whose class exists, whose `kind` kernels are registered, and that run on `device`, best first."""
    registered = kernel_backends(kind)
    triton_on_cpu = os.environ.get("TRITON_INTERPRET") == "1"
    return [
        name
        for name, cls_name in BACKEND_CLASSES.items()
        if name in registered
        and hasattr(backends, cls_name)
        and (device.type == "cuda" or name not in _CUDA_ONLY or (name == "triton" and triton_on_cpu))
    ]


def choose_attention_backend(name: str, device: torch.device, spec: KVCacheSpec) -> AttentionBackend:
    """The backend `name` ("auto" | "native" | "triton" | "flashinfer") for a model with cache spec `spec`.

    Hybrid models get HybridAttnBackend(full, NativeGDNBackend(), full-attention layer ids).
    """
    kind = "attention" if spec.needs_kv_cache else "encoder_attention"
    available = available_backends(device, kind)
    if name != "auto" and name not in BACKEND_CLASSES:
        raise ValueError(
            f"unknown attention backend {name!r}: choose 'auto' or one of {sorted(BACKEND_CLASSES)} "
            f"(available on {device.type}: {available})"
        )
    if name == "auto":
        if not available:
            raise RuntimeError(
                f"no attention backend is available on {device} (known: {sorted(BACKEND_CLASSES)})"
            )
        name = available[0]
    elif name not in available:
        raise ValueError(f"attention backend {name!r} is not available on {device} (available: {available})")
    full = getattr(backends, BACKEND_CLASSES[name])()
    if spec.gdn_layer_ids:
        return backends.HybridAttnBackend(full, backends.NativeGDNBackend(), spec.full_attention_layer_ids)
    return full
