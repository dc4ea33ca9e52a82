"""Where and in what precision a model runs: the `device` and `dtype` arguments, checked before anything loads.

Bad values are argument errors (ValueError, or TypeError for a wrong type) in radixc's words, so a user never
reaches torch's assertion deep inside a weight copy, or a CheckpointError for what was never a checkpoint.
"""

from __future__ import annotations

import torch

from radixc.models.config import DTYPE_NAMES, parse_dtype
from radixc.models.weights import CheckpointError

DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device to run on: `device` once checked to exist here, or (None) cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__} {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device name such as 'cpu', 'cuda' or 'cuda:1'") from err
    if parsed.type not in DEVICE_TYPES:
        raise ValueError(f"device={device!r}: radixc runs on {' or '.join(DEVICE_TYPES)}, not {parsed.type}")
    if parsed.type == "cuda":
        _check_cuda(parsed, device)
    return parsed


def _check_cuda(parsed: torch.device, asked: torch.device | str) -> None:
    """Raise ValueError when this process cannot use the CUDA device asked for, saying why."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:  # ROCm builds use cuda too
        raise ValueError(
            f"device={str(asked)!r}: this torch ({torch.__version__}) is a CPU-only build without CUDA; "
            "install a CUDA build of torch, or use device='cpu'"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(
            f"device={str(asked)!r}: torch {torch.__version__} sees no CUDA device "
            "here (check the driver and CUDA_VISIBLE_DEVICES), or use device='cpu'"
        )
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"device={str(asked)!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})"
        )


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The floating-point dtype to load weights in, from a torch dtype or its name; None keeps the model's."""
    if dtype is None:
        return None
    if not isinstance(dtype, (str, torch.dtype)):
        raise TypeError(f"dtype must be a str or torch.dtype, got {type(dtype).__name__} {dtype!r}")
    try:
        parsed = parse_dtype(dtype)
    except CheckpointError:
        parsed = None
    if parsed is None or not parsed.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating-point dtype radixc loads weights in "
            f"(use one of {', '.join(DTYPE_NAMES)}, or a torch floating-point dtype)"
        )
    return parsed
