"""Backend choice: "auto" picks the best backend for the model's device, hybrids get the GDN composite, and
unknown or unavailable backends fail naming what is available."""

from __future__ import annotations

import pytest
import torch

from radixc.cache_spec import KVCacheSpec
from radixc.engine.backends import HybridAttnBackend, NativeBackend, available_backends, choose_backend

CPU = torch.device("cpu")
DENSE = KVCacheSpec(2, 2, 16, 16, (0, 1))
HYBRID = KVCacheSpec(3, 2, 16, 16, (1,), gdn_layer_ids=(0, 2), conv_dim=8, conv_kernel_size=4)
ENCODER = KVCacheSpec(2, 2, 16, 16, ())


def test_auto_on_cpu_is_native_and_hybrids_pair_it_with_its_own_gdn_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert available_backends(CPU) == ["native"]
    assert type(choose_backend("auto", CPU, DENSE)) is NativeBackend
    hybrid = choose_backend("native", CPU, HYBRID)
    assert isinstance(hybrid, HybridAttnBackend)
    assert hybrid.gdn_backend is hybrid.full_attn_backend and hybrid.full_attn_layer_ids == {1}


def test_unknown_backend_names_the_choices_and_an_unavailable_one_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"unknown attention backend 'fast'.*available on cpu: \['native'\]"):
        choose_backend("fast", CPU, DENSE)
    with pytest.raises(ValueError, match=r"'triton' is not available on cpu: .*run on CUDA devices"):
        choose_backend("triton", CPU, DENSE)


def test_the_choice_follows_the_model_device_not_the_machine(monkeypatch):
    """A CPU model gets CPU kernels even where CUDA exists (the Triton kernels cannot read CPU tensors)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_backends(CPU) == ["native"]
    assert type(choose_backend("auto", CPU, HYBRID).gdn_backend) is NativeBackend


def test_triton_under_the_cpu_interpreter_is_chosen_by_name_only_and_runs_gdn_too(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends(CPU)[0] == "triton"
    assert type(choose_backend("auto", CPU, DENSE)) is NativeBackend
    hybrid = choose_backend("triton", CPU, HYBRID)
    assert (hybrid.full_attn_backend.name, hybrid.gdn_backend.name) == ("triton", "triton")


def test_encoder_only_models_get_a_backend_with_cache_free_attention(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends(CPU, ENCODER) == ["native"]
    with pytest.raises(ValueError, match="no cache-free attention for encoder-only models"):
        choose_backend("triton", CPU, ENCODER)
