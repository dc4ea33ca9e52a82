"""The qkv GEMV + RoPE + KV-store fusion on compiled decode graphs: where it applies (llama-style attention on the
Triton backend) the decode steps give eager's logits through the fused kernel, whose writes to the cache the
later steps read; where it does not (per-head q/k norms, Qwen3) the graph keeps its rope op. The GEMV lowering
rewrites CUDA graphs only; here it is widened to the CPU, where the kernels run under the Triton interpreter."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import radixc
from radixc.models.presets import build_preset
from radixc.passes.fuse_linear_rope_store_kv import FuseLinearRopeStoreKV
from radixc.passes.lower_linear import LowerSmallBatchLinear

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="runs the kernels on CPU tensors under the interpreter; on a GPU the CUDA-graph tests decode through it",
    ),
]

# decode graph rewrites: one per attention layer where the fused kernel applies
EXPECTED_REWRITES = {"tiny-llama": 2, "tiny-qwen3": 0}


@pytest.mark.parametrize("preset", sorted(EXPECTED_REWRITES))
@pytest.mark.parametrize("batch", [1, 3], ids=["one-row", "three-rows"])
def test_compiled_decode_through_the_fused_qkv_kernel_gives_eager_logits(ph, preset, batch, monkeypatch):
    monkeypatch.setattr(radixc.passes.config, "fuse_linear_rope_store_kv", True)
    model = build_preset(preset, dtype=torch.float32, seed=7)
    prompts = [[5, 9, 2, 7], [4, 6], [11, 12, 13]][:batch]

    def run(compile: bool) -> list[torch.Tensor]:
        return ph.greedy_decode_logits(model, "triton", compile, prompts, steps=4)

    expected = run(compile=False)
    manager = radixc.passes.install()
    manager.history.clear()
    torch._dynamo.reset()
    with (
        mock.patch.object(LowerSmallBatchLinear, "device_types", ("cpu",)),
        torch._inductor.config.patch(fx_graph_cache=False),
    ):
        got = run(compile=True)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    name = FuseLinearRopeStoreKV.name
    assert [counts[name] for counts in manager.history] == [0, EXPECTED_REWRITES[preset]]


def test_on_by_default():
    assert radixc.passes.PassConfig().fuse_linear_rope_store_kv
