"""Programmatic dependent launch (PDL): whether kernels on a device may start while the kernel before them drains.

On Hopper and later GPUs a kernel launched with PDL is scheduled as soon as the kernel before it signals
(griddepcontrol.launch_dependents) and waits (griddepcontrol.wait) only where it first touches memory; a decode
step is a chain of a few hundred kernels of a few microseconds each, and PDL hides part of the launch and ramp of
each behind the tail of the one before. With `RADIXC_PDL=1` in the environment radixc's decode kernels launch with
it, and the runner compiles with Inductor's `triton.enable_pdl` so that Inductor's kernels do too.

It is off by default: on an H200 it took 2% (llama-1b) and 7.5% (qwen3.5-0.8b) off a batch-1 decode step and
nothing at batch 32, while Inductor's static kernel launcher refuses kernels with launch attributes, so every
Inductor kernel then loads through Triton's launcher; llama-1b's warm start measured 16-26 s with PDL against
10-12 s without (two machines; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import os

import torch

PDL_ENV = "RADIXC_PDL"


@functools.cache
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """True when `RADIXC_PDL=1` and the device is a CUDA device of compute capability 9.0 or more."""
    if device.type != "cuda" or os.environ.get(PDL_ENV, "0") != "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _supports_pdl(index)


def inductor_options(device: torch.device) -> dict[str, bool]:
    """`torch.compile` options for a model on `device`: Inductor's kernels launched with PDL where it holds."""
    return {"triton.enable_pdl": True} if pdl_enabled(device) else {}
