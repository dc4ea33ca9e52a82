"""The device and dtype arguments: bad values are ValueErrors in radixc's words, raised before anything loads
(CUDA situations this machine lacks are simulated by patching what torch reports)."""

from __future__ import annotations

import pytest
import torch

import radixc.engine.llm as llm_module
from radixc.engine.llm import LLM
from radixc.engine.placement import resolve_device, resolve_dtype
from radixc.models import CheckpointError


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if LLM gets as far as loading a model."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the argument was checked")

    monkeypatch.setattr(llm_module, "load_model_or_preset", load)


def cuda(monkeypatch, build: str | None, devices: int) -> None:
    """Make torch report a CUDA build `build` (None: CPU-only) with `devices` visible devices."""
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


@pytest.mark.parametrize(
    "build, devices, device, match",
    [
        (None, 0, "cuda", r"^device='cuda': this torch \(.*\) is a CPU-only build without CUDA"),
        (
            "12.8",
            0,
            "cuda:0",
            r"^device='cuda:0': torch .* sees no CUDA device here \(check the driver and CUDA_VISIBLE_DEVICES\)",
        ),
        ("12.8", 2, torch.device("cuda", 2), r"^device='cuda:2': only 2 CUDA device\(s\) are visible"),
    ],
    ids=["cpu_only_torch", "no_visible_device", "index_past_the_devices"],
)
def test_unusable_cuda_device_is_a_value_error_before_loading(
    monkeypatch, no_loading, build, devices, device, match
):
    cuda(monkeypatch, build, devices)
    with pytest.raises(ValueError, match=match):
        resolve_device(device)
    with pytest.raises(ValueError, match=match):
        LLM("tiny-llama", device=device)


def test_visible_cuda_devices_resolve_and_the_default_follows_availability(monkeypatch):
    cuda(monkeypatch, "12.8", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    cuda(monkeypatch, None, 0)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "device, error, match",
    [
        ("gpu", ValueError, r"^device='gpu' is not a device name such as 'cpu', 'cuda' or 'cuda:1'"),
        ("cuda:x", ValueError, "^device='cuda:x' is not a device name"),
        ("meta", ValueError, "^device='meta': radixc runs on cpu or cuda, not meta"),
        (0, TypeError, "^device must be a str or torch.device, got int 0"),
    ],
)
def test_unknown_device_names_raise_before_loading(no_loading, device, error, match):
    with pytest.raises(error, match=match):
        LLM("tiny-llama", device=device)


@pytest.mark.parametrize(
    "dtype, error, match",
    [
        (
            "float17",
            ValueError,
            r"^dtype='float17' is not a floating-point dtype radixc loads weights in \(use one of float32, bfloat16",
        ),
        (torch.int8, ValueError, "^dtype=torch.int8 is not a floating-point dtype"),
        ("bool", ValueError, "^dtype='bool' is not"),
        (16, TypeError, "^dtype must be a str or torch.dtype, got int 16"),
    ],
)
def test_bad_dtype_is_an_argument_error_not_a_checkpoint_error(no_loading, dtype, error, match):
    with pytest.raises(error, match=match) as raised:
        LLM("tiny-llama", dtype=dtype)
    assert not isinstance(raised.value, CheckpointError)


def test_dtype_names_and_torch_dtypes_resolve():
    assert resolve_dtype(None) is None
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("half") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64


def test_llm_loads_on_the_resolved_device_in_the_asked_dtype():
    llm = LLM("tiny-llama", device="cpu", dtype="bfloat16", compile=False, progress=False)
    parameter = next(llm.model.parameters())
    assert parameter.device == torch.device("cpu") and parameter.dtype is torch.bfloat16
