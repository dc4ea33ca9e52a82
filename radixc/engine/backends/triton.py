"""Triton backends: paged attention and GDN kernels that read all sizes on the device (CUDA-graph capturable)."""

from __future__ import annotations

from radixc.engine.backends.kernel_op_backend import GDNOnly, KernelOpBackend
from radixc.ops import triton as triton_kernels


class TritonBackend(KernelOpBackend):
    """Triton paged extend / split-KV decode attention. Needs CUDA, or TRITON_INTERPRET=1 on the CPU."""

    name = "triton"

    def __init__(self):
        if not triton_kernels.is_available():
            raise RuntimeError(
                f"{type(self).__name__}: Triton cannot run here (needs triton and a CUDA device, or TRITON_INTERPRET=1)"
            )


class TritonGDNBackend(GDNOnly, TritonBackend):
    """Triton Gated DeltaNet: chunked (WY form) prefill and recurrent decode kernels, causal conv1d kernels."""
