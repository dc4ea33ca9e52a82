"""benchmarks/decode_profile.py on the CPU: its refusal without CUDA, and the per-step kernel table it builds from
profiler events."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_profile.py"


@pytest.fixture(scope="module")
def profile_script():
    spec = importlib.util.spec_from_file_location("benchmark_decode_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_clearly_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny-llama"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    assert "needs a CUDA device" in result.stderr


def _event(name: str, micros: float, device: bool = True) -> SimpleNamespace:
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=kind, device_time_total=micros)


def test_kernel_table_is_per_step_and_most_time_first(profile_script):
    events = [_event("gemm", 10.0), _event("norm", 2.0), _event("gemm", 12.0), _event("norm", 2.0)]
    events += [_event("gemm", 11.0), _event("norm", 3.0), _event("gemm", 13.0), _event("norm", 1.0)]
    events.append(_event("aten::mm", 500.0, device=False))  # host-side op: not a kernel
    prof = SimpleNamespace(events=lambda: events)
    assert profile_script.kernel_times(prof, steps=2) == [("gemm", 2, 23.0), ("norm", 2, 4.0)]
    row = {
        "batch_size": 1,
        "step_ms": 0.05,
        "host_ms": 0.01,
        "kernel_ms": 0.027,
        "kernels_per_step": 4,
        "floor_ms": 0.02,
        "top": [{"kernel": "gemm", "per_step": 2, "us": 23.0}, {"kernel": "norm", "per_step": 2, "us": 4.0}],
    }
    text = profile_script.render(row)
    assert "step/floor 2.50x" in text and "kernels/floor 1.35x" in text
    assert "85.2%  gemm" in text
