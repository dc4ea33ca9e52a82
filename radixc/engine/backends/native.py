"""Torch-native backends: full attention and GDN on any device (the reference and the CPU path)."""

from __future__ import annotations

from radixc.engine.backends.kernel_op_backend import GDNOnly, KernelOpBackend

_NOT_CAPTURABLE = "the native backend cannot run inside CUDA graphs (its kernels read lengths on the host)"


class NativeBackend(KernelOpBackend):
    """Torch-native paged attention. Its kernels size work on the host, so it is never captured in a CUDA graph."""

    name = "native"

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        raise NotImplementedError(_NOT_CAPTURABLE)

    def init_forward_metadata_capture_cuda_graph(self, *args, **kwargs) -> None:
        raise NotImplementedError(_NOT_CAPTURABLE)

    def init_forward_metadata_replay_cuda_graph(self, *args, **kwargs) -> None:
        raise NotImplementedError(_NOT_CAPTURABLE)


class NativeGDNBackend(GDNOnly, NativeBackend):
    """Torch-native Gated DeltaNet: chunked delta rule for extend, recurrent for decode."""
