"""Which attention backend serves a model on a device: a name the user gives, or the best available one."""

from __future__ import annotations

import os

import torch

from radixc.engine import backends
from radixc.engine.backends.base import AttentionBackend
from radixc.models.config import KVCacheSpec
from radixc.ops import triton as triton_kernels
from radixc.ops.library import kernel_backends

# backend name -> (full-attention class, GDN class) in radixc.engine.backends; "auto" tries them in this order
BACKEND_CLASSES = {
    "triton": ("TritonBackend", "TritonGDNBackend"),
    "native": ("NativeBackend", "NativeGDNBackend"),
}
# backends users will look for that radixc does not have yet
NOT_BUILT = {"flashinfer": "the FlashInfer backend is not built yet; use 'triton' or 'native'"}


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "native":
        return True
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        return triton_kernels.is_available() and (device.type == "cuda" or interpret)
    return device.type == "cuda"


def available_backends(device: torch.device, kind: str = "attention") -> list[str]:
    """Backends whose class exists, whose `kind` kernels are registered, and that run on `device`, best first."""
    registered = kernel_backends(kind)
    return [
        name
        for name, (cls_name, _) in BACKEND_CLASSES.items()
        if name in registered and hasattr(backends, cls_name) and _runs_on(name, device)
    ]


def choose_attention_backend(name: str, device: torch.device, spec: KVCacheSpec) -> AttentionBackend:
    """The backend `name` ("auto" | "native" | "triton" | "flashinfer") for a model with cache spec `spec`.

    Hybrid models get HybridAttnBackend(full, GDN backend of the same name if there is one, else native).
    """
    kind = "attention" if spec.needs_kv_cache else "encoder_attention"
    available = available_backends(device, kind)
    if name in NOT_BUILT:
        raise ValueError(f"attention backend {name!r}: {NOT_BUILT[name]}")
    if name != "auto" and name not in BACKEND_CLASSES:
        raise ValueError(
            f"unknown attention backend {name!r}: choose 'auto' or one of {sorted(BACKEND_CLASSES)} "
            f"(available on {device.type}: {available})"
        )
    if name == "auto":
        # off CUDA only the native kernels run at speed (Triton's CPU interpreter is for testing, asked by name)
        candidates = [n for n in available if device.type == "cuda" or n == "native"]
        if not candidates:
            raise RuntimeError(f"no attention backend runs on {device} (known: {sorted(BACKEND_CLASSES)})")
        name = candidates[0]
    elif name not in available:
        raise ValueError(f"attention backend {name!r} is not available on {device} (available: {available})")
    full_cls, gdn_cls = BACKEND_CLASSES[name]
    full = getattr(backends, full_cls)()
    if not spec.gdn_layer_ids:
        return full
    if gdn_cls is None or name not in available_backends(device, "gdn") or not hasattr(backends, gdn_cls):
        gdn_cls = "NativeGDNBackend"
    gdn = getattr(backends, gdn_cls)()
    return backends.HybridAttnBackend(full, gdn, spec.full_attention_layer_ids)
