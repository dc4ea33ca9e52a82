"""Backend choice: "auto" picks the best available backend for the device, hybrids get the GDN composite,
and unknown or unavailable backends fail naming what is available."""

from __future__ import annotations

import pytest
import torch

from radixc.engine.backend_choice import available_backends, choose_attention_backend
from radixc.engine.backends import HybridAttnBackend, NativeBackend, NativeGDNBackend
from radixc.models.config import KVCacheSpec

CPU = torch.device("cpu")
DENSE = KVCacheSpec(2, 2, 16, 16, (0, 1))
HYBRID = KVCacheSpec(3, 2, 16, 16, (1,), gdn_layer_ids=(0, 2), conv_dim=8, conv_kernel_size=4)


def test_auto_on_cpu_is_native_and_hybrids_pair_it_with_native_gdn(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "native" in available_backends(CPU)
    assert type(choose_attention_backend("auto", CPU, DENSE)) is NativeBackend
    hybrid = choose_attention_backend("native", CPU, HYBRID)
    assert isinstance(hybrid, HybridAttnBackend)
    assert isinstance(hybrid.gdn_backend, NativeGDNBackend) and hybrid.full_attn_layer_ids == {1}


def test_unknown_backend_names_the_choices_and_an_unavailable_one_names_what_is_available(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"unknown attention backend 'fast'.*available on cpu: \['native'\]"):
        choose_attention_backend("fast", CPU, DENSE)
    with pytest.raises(ValueError, match=r"'triton' is not available on cpu \(available: \['native'\]\)"):
        choose_attention_backend("triton", CPU, DENSE)
    with pytest.raises(ValueError, match="FlashInfer backend is not built yet"):
        choose_attention_backend("flashinfer", CPU, DENSE)


def test_triton_under_the_cpu_interpreter_is_chosen_by_name_only_and_pairs_with_triton_gdn(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends(CPU)[0] == "triton"
    assert type(choose_attention_backend("auto", CPU, DENSE)) is NativeBackend
    hybrid = choose_attention_backend("triton", CPU, HYBRID)
    assert (hybrid.full_attn_backend.name, type(hybrid.gdn_backend).__name__) == (
        "triton",
        "TritonGDNBackend",
    )
