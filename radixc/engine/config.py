"""EngineConfig: the engine's limits (batch, tokens per step, context, KV pool size), defaults from the device.

On CUDA the KV pool gets what is left of `gpu_memory_utilization` x the device's free memory (measured after the
weights are loaded) once the GDN state slots and a reserve for activations, compilation workspaces and CUDA-graph
pools are set aside, so a second model, the compiler and graph capture still find memory.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from radixc.cache_spec import KVCacheSpec

logger = logging.getLogger("radixc.engine")

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class DeviceDefaults:
    """Limits used where the user gives none: a fixed KV budget (CPU), or a share of free memory (CUDA)."""

    max_batch_size: int
    max_tokens_per_step: int
    max_context_len: int
    kv_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None


# CPU: small, so tests and laptops stay light. CUDA: a share of the memory left after the weights.
DEVICE_DEFAULTS = {
    "cpu": DeviceDefaults(
        max_batch_size=32, max_tokens_per_step=512, max_context_len=4096, kv_memory_bytes=128 * _MIB
    ),
    "cuda": DeviceDefaults(
        max_batch_size=256, max_tokens_per_step=8192, max_context_len=32768, gpu_memory_utilization=0.8
    ),
}
# set aside on CUDA beyond the activations and the CUDA graphs: Inductor/Triton workspaces
COMPILE_RESERVE = 512 * _MIB


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Resolved limits. num_kv_pages counts the reserved padding page; 0 for models without a KV cache."""

    device: torch.device
    page_size: int
    max_batch_size: int
    max_tokens_per_step: int
    max_context_len: int
    num_kv_pages: int

    @staticmethod
    def default_max_tokens_per_step(device: torch.device) -> int:
        return DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"]).max_tokens_per_step

    @staticmethod
    def default_max_batch_size(device: torch.device) -> int:
        return DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"]).max_batch_size

    @classmethod
    def resolve(
        cls,
        device: torch.device,
        spec: KVCacheSpec,
        kv_dtype: torch.dtype,
        model_max_positions: int | None,
        *,
        page_size: int = 16,
        max_batch_size: int | None = None,
        max_tokens_per_step: int | None = None,
        max_context_len: int | None = None,
        kv_memory_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        activation_bytes: int = 0,
        cuda_graph_bytes: int = 0,
    ) -> EngineConfig:
        """Fill unset limits from the device's defaults and fit the context length to the model and pool.

        activation_bytes: the largest step's activations; cuda_graph_bytes: what the captured graphs will hold
        (the caller's estimates), both reserved before the pool.
        """
        defaults = DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"])
        for name, value in (
            ("page_size", page_size),
            ("max_batch_size", max_batch_size),
            ("max_tokens_per_step", max_tokens_per_step),
            ("max_context_len", max_context_len),
            ("kv_memory_bytes", kv_memory_bytes),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig: {name} must be a positive int, got {value!r}")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"EngineConfig: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"
            )
        max_batch_size = max_batch_size or defaults.max_batch_size
        max_tokens_per_step = max_tokens_per_step or defaults.max_tokens_per_step
        page_bytes = (
            page_size
            * len(spec.full_attention_layer_ids)
            * spec.num_kv_heads
            * (spec.head_dim + spec.v_head_dim)
            * kv_dtype.itemsize
        )
        num_kv_pages = 0
        context = max_context_len or defaults.max_context_len
        if spec.needs_kv_cache:
            budget = kv_memory_bytes
            if budget is None:
                # never more than every request at its longest context can use
                longest = min(context, model_max_positions or context)
                useful = max_batch_size * -(-longest // page_size) * page_bytes
                budget = min(
                    useful,
                    _default_kv_bytes(
                        device,
                        defaults,
                        spec,
                        max_batch_size,
                        kv_dtype,
                        gpu_memory_utilization,
                        activation_bytes,
                        cuda_graph_bytes,
                    ),
                )
            num_kv_pages = budget // page_bytes + 1
            if num_kv_pages < 2:
                raise ValueError(
                    f"EngineConfig: kv_memory_bytes={budget} holds no KV page (one page takes {page_bytes} bytes)"
                )
        limits = {"the model's max_position_embeddings": model_max_positions}
        if spec.needs_kv_cache:
            limits["the KV pool"] = (num_kv_pages - 1) * page_size
        for what, limit in limits.items():
            if limit is not None and context > limit:
                if max_context_len is not None:
                    raise ValueError(
                        f"EngineConfig: max_context_len={max_context_len} exceeds {what} ({limit})"
                    )
                context = limit
        logger.info(
            "engine limits on %s: batch %d, %d tokens/step, context %d, %d KV pages of %d tokens",
            device,
            max_batch_size,
            max_tokens_per_step,
            context,
            num_kv_pages,
            page_size,
        )
        return cls(
            device=device,
            page_size=page_size,
            max_batch_size=max_batch_size,
            max_tokens_per_step=max_tokens_per_step,
            max_context_len=context,
            num_kv_pages=num_kv_pages,
        )


def gdn_state_bytes(spec: KVCacheSpec, conv_dtype: torch.dtype) -> int:
    """Bytes of one request's GDN state over all GDN layers (conv window + float32 recurrent state)."""
    conv = spec.conv_dim * max(spec.conv_kernel_size - 1, 0) * conv_dtype.itemsize
    recurrent = spec.num_v_heads * spec.head_k_dim * spec.head_v_dim * 4
    return spec.num_gdn_layers * (conv + recurrent)


def _default_kv_bytes(
    device: torch.device,
    defaults: DeviceDefaults,
    spec: KVCacheSpec,
    max_batch_size: int,
    kv_dtype: torch.dtype,
    gpu_memory_utilization: float | None,
    activation_bytes: int,
    cuda_graph_bytes: int,
) -> int:
    """The KV budget: the device default on the CPU; on CUDA, the utilisation share of free memory less the GDN
    slots, the activations, the CUDA graphs and the compile reserve."""
    utilization = gpu_memory_utilization or defaults.gpu_memory_utilization
    if utilization is None:
        return defaults.kv_memory_bytes
    free, _ = torch.cuda.mem_get_info(device)
    gdn = (max_batch_size + 1) * gdn_state_bytes(spec, kv_dtype)
    reserve = activation_bytes + cuda_graph_bytes + COMPILE_RESERVE
    budget = int(free * utilization) - gdn - reserve
    logger.info(
        "KV budget on %s: %.2f GiB = %.0f%% of %.2f GiB free - %.2f GiB GDN state - %.2f GiB reserved "
        "(activations %.2f GiB, CUDA graphs %.2f GiB, compilation %.2f GiB)",
        device,
        budget / 2**30,
        100 * utilization,
        free / 2**30,
        gdn / 2**30,
        reserve / 2**30,
        activation_bytes / 2**30,
        cuda_graph_bytes / 2**30,
        COMPILE_RESERVE / 2**30,
    )
    if budget <= 0:
        raise ValueError(
            f"EngineConfig: no memory left on {device} for a KV pool: {100 * utilization:.0f}% of "
            f"{free / 2**30:.2f} GiB free, less {gdn / 2**30:.2f} GiB of GDN state and {reserve / 2**30:.2f} GiB "
            "reserved for activations, compilation and CUDA graphs; free memory, raise gpu_memory_utilization or "
            "set kv_memory_bytes"
        )
    return budget
