"""Programmatic dependent launch (PDL): whether kernels on a device may start while the kernel before them drains.

On Hopper and later GPUs a kernel launched with PDL is scheduled as soon as the kernel before it signals
(griddepcontrol.launch_dependents) and waits (griddepcontrol.wait) only where it first touches memory; a decode
step is a chain of a few hundred kernels of a few microseconds each, and PDL hides part of the launch and ramp of
each behind the tail of the one before.

`RADIXC_PDL` in the environment: unset or `1` (the default), radixc's own decode kernels launch with PDL on such
devices; `all`, the runner also compiles with Inductor's `triton.enable_pdl` so that Inductor's kernels do too;
`0`, nothing does. Inductor's kernels are left out by default: its static kernel launcher refuses kernels with
launch attributes, so under `all` every Inductor kernel loads through Triton's launcher, and llama-1b's warm
start measured 16-26 s against 10-12 s without (benchmarks/RESULTS.md). radixc's kernels always load through
Triton's launcher, so their PDL costs no start-up time; in a decode step fused by radixc's passes they are nearly
every kernel.
"""

from __future__ import annotations

import functools
import os

import torch

PDL_ENV = "RADIXC_PDL"


@functools.cache
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


PDL_SETTINGS = ("0", "1", "all")


def _setting() -> str:
    """`RADIXC_PDL`'s value, checked."""
    setting = os.environ.get(PDL_ENV, "1")
    if setting not in PDL_SETTINGS:
        raise ValueError(f"{PDL_ENV} must be one of {', '.join(PDL_SETTINGS)}, got {setting!r}")
    return setting


def pdl_enabled(device: torch.device) -> bool:
    """True when radixc's kernels on `device` launch with PDL: `RADIXC_PDL` is not `0` and the device is a CUDA
    device of compute capability 9.0 or more."""
    if device.type != "cuda" or _setting() == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _supports_pdl(index)


def inductor_options(device: torch.device) -> dict[str, bool]:
    """`torch.compile` options for a model on `device`: Inductor's kernels launched with PDL where
    `RADIXC_PDL=all` and the device has it."""
    return {"triton.enable_pdl": True} if _setting() == "all" and pdl_enabled(device) else {}
