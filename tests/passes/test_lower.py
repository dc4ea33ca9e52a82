"""Lowering: each generic node becomes its own backend's kernels; GDN becomes a conv1d kernel (with SiLU and the
q/k/v split fused in, or left to Inductor) and a delta-rule kernel; native kernels are marked for partitioning."""

from __future__ import annotations

import pytest
import torch

from radixc.engine import NativeBackend, TritonBackend


@pytest.mark.parametrize("fuse", [False, True])
def test_gdn_lowers_to_conv_and_delta_rule_kernels_with_the_conv_fusion_switchable(ph, fuse):
    torch.manual_seed(2)
    model = ph.GDNBlock()
    expected, _, _, eager_pool = ph.run_gdn(model, compiled=False)
    outputs, history, code, pool = ph.run_gdn(model, compiled=True, fuse_gdn_conv=fuse)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.ssm_state[0], eager_pool.ssm_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.conv_state[0], eager_pool.conv_state[0])
    # both native kernels (conv and delta rule) read lengths on the host: marked to run outside CUDA graphs
    assert [h["mark_cudagraph_partitions"] for h in history] == [2, 2]
    for mode in ("extend", "decode"):
        assert f"radixc.native_gated_delta_rule_{mode}.default(" in code
        assert (f"radixc.native_causal_conv1d_silu_{mode}.default(" in code) == fuse
        assert (f"radixc.native_causal_conv1d_{mode}.default(" in code) == (not fuse)
    assert "radixc.gdn.default" not in code
    assert ph.pool_copies(code, pool.conv_state + pool.ssm_state) == []


@pytest.mark.triton
def test_each_node_lowers_to_its_own_backend_in_a_hybrid_graph(ph, monkeypatch):
    """Full attention on native and GDN on Triton (under the interpreter) in one graph: each node's kernels are
    its own backend's, with no dispatch left (on the GPU when there is one: Triton kernels need CUDA tensors there)."""
    torch.manual_seed(2)
    model = ph.HybridBlock().to("cuda" if torch.cuda.is_available() else "cpu")
    expected, _, _, eager_kv, eager_gdn = ph.run_hybrid(model, False, NativeBackend(), NativeBackend())
    with ph.switches(fuse_gdn_decode=False):  # lowering's kernels, not the fusion after it
        outputs, _, code, kv_pool, gdn_pool = ph.run_hybrid(model, True, NativeBackend(), TritonBackend())
    for mode in ("extend", "decode"):
        assert f"radixc.native_{mode}_attention.default(" in code
        assert f"radixc.triton_gated_delta_rule_{mode}.default(" in code
        assert f"radixc.native_gated_delta_rule_{mode}" not in code
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gdn_pool.ssm_state[0], eager_gdn.ssm_state[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv_pool.k_buffer[1], eager_kv.k_buffer[1], atol=1e-5, rtol=1e-5)
