"""Triton kernels, each with a native twin in radixc.ops.native; loaded lazily so triton stays optional."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

# launcher name -> module (inside this package) that defines it
_LAUNCHERS = {
    "paged_decode_attention": "attention_decode",
    "paged_extend_attention": "attention_extend",
    "causal_conv1d_extend": "causal_conv1d",
    "causal_conv1d_decode": "causal_conv1d",
    "recurrent_gated_delta_rule": "gdn_recurrent",
    "gated_recurrent_step": "gdn_recurrent",
    "chunk_gated_delta_rule": "gdn_chunk",
    "gdn_decode_step": "gdn_decode",
    "rotary_and_store_kv": "rope_kv_store",
    "small_batch_linear": "gemv",
    "linear_rope_store_kv": "linear_rope",
    "silu_and_mul": "activation",
    "sigmoid_gate": "activation",
    "rms_norm": "norm",
}

__all__ = ["is_available", *_LAUNCHERS]


def is_available() -> bool:
    """True when triton imports and can run here: on a CUDA device, or on CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def __getattr__(name: str) -> Any:
    module = _LAUNCHERS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
