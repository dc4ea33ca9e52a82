"""Host-to-device copies that do not wait for the device, for the host work done while a step runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def queued_tensor(
    values: Sequence[int | float | bool], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`values` as a tensor on `device`, copied from pinned memory without waiting: `torch.tensor(values,
    device="cuda")` copies from pageable memory and so waits for every kernel already queued, which would stall
    the host behind the step in flight."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
