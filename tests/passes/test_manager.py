"""The pass manager: every switch combination rewrites as switched with numerics unchanged and no pool copy,
graphs without radixc ops are untouched while a user's pass still runs, and the uuid follows switches and source."""

from __future__ import annotations

import pytest
import torch

import radixc
from radixc.passes import manager as pass_manager


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fuse_rope_kv_store", [False, True])
@pytest.mark.parametrize("fuse_qk_norm_rope", [False, True])
def test_each_pass_combination_rewrites_as_switched_keeps_numerics_and_never_copies_the_pool(
    ph, qk_norm, fuse_rope_kv_store, fuse_qk_norm_rope
):
    torch.manual_seed(0)
    model = ph.RopeAttention(qk_norm=qk_norm)
    expected = ph.run_attention(model, compiled=False)[0]
    outputs, history, code, pool = ph.run_attention(
        model, compiled=True, fuse_rope_kv_store=fuse_rope_kv_store, fuse_qk_norm_rope=fuse_qk_norm_rope
    )
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert pool.k_buffer[0].abs().sum() > 0
    assert len(history) == 2  # one extend and one decode graph
    for counts in history:
        assert counts["defunctionalize"] == 1 and counts["lower_radixc_ops"] == 1 + fuse_rope_kv_store
        assert counts.get("fuse_rope_kv_store", 0) == int(fuse_rope_kv_store)
        assert counts.get("fuse_qk_norm_rope", 0) == int(fuse_qk_norm_rope and qk_norm)
    # the output code calls the kernel ops directly, in place on the pool
    assert "torch.ops.radixc.native_extend_attention.default(" in code
    assert "torch.ops.radixc.native_decode_attention.default(" in code
    assert "torch.ops.radixc.attention.default(" not in code
    assert ("native_rope_store_kv" in code) == fuse_rope_kv_store
    assert ("rotary_embedding" in code) == (not fuse_rope_kv_store and not (qk_norm and fuse_qk_norm_rope))
    assert ("radixc.rms_norm" in code) == (qk_norm and not fuse_qk_norm_rope)
    assert ph.pool_copies(code, pool.k_buffer + pool.v_buffer) == []
    assert "clone" not in code


def test_graphs_without_radixc_ops_are_untouched_and_user_passes_still_run():
    seen = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(len(graph.nodes))

        def uuid(self):
            return "user-pass-v1"

    original = torch._inductor.config.post_grad_custom_post_pass
    try:
        torch._inductor.config.post_grad_custom_post_pass = UserPass()
        manager = radixc.passes.install()
        assert manager.chained is not None
        manager.history.clear()
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            torch.compile(lambda x: torch.relu(x) * 2)(torch.randn(8))
        assert seen and manager.history == []
    finally:
        torch._inductor.config.post_grad_custom_post_pass = original


def test_uuid_is_stable_and_changes_with_switches_and_pass_source(ph, monkeypatch):
    manager = pass_manager.RadixPassManager()
    first = manager.uuid()
    assert first == pass_manager.RadixPassManager().uuid()
    for switch in ("fuse_rope_kv_store", "fuse_qk_norm_rope", "fuse_gdn_conv"):
        with ph.switches(**{switch: False}):
            assert manager.uuid() != first
    assert manager.uuid() == first
    inspect_module = pass_manager.RadixPass.uuid.__globals__["inspect"]
    real_getsource = inspect_module.getsource
    monkeypatch.setattr(inspect_module, "getsource", lambda obj: real_getsource(obj) + "# edit")
    assert manager.uuid() != first


def test_a_pass_uuid_follows_the_matchers_it_borrows(monkeypatch):
    """The GDN decode fusion matches the gated norm with the RMSNorm and SiLU matchers of two other passes'
    modules: an edit there changes its uuid even while those passes are switched off."""
    from radixc.passes import fuse_silu_mul_linear
    from radixc.passes.fuse_gdn_decode import FuseGDNDecode

    first = FuseGDNDecode().uuid()
    inspect_module = pass_manager.RadixPass.uuid.__globals__["inspect"]
    real_getsource = inspect_module.getsource

    def edited(module):
        return real_getsource(module) + ("# edit" if module is fuse_silu_mul_linear else "")

    monkeypatch.setattr(inspect_module, "getsource", edited)
    assert FuseGDNDecode().uuid() != first


def test_set_switches_sets_named_switches_and_names_a_bad_one(monkeypatch):
    monkeypatch.setattr(pass_manager, "config", pass_manager.PassConfig())
    pass_manager.set_switches("fuse_rms_norm_linear=0,fuse_gdn_conv=0")
    assert not pass_manager.config.fuse_rms_norm_linear and not pass_manager.config.fuse_gdn_conv
    assert pass_manager.config.fuse_rope_kv_store
    pass_manager.set_switches("")
    pass_manager.set_switches("fuse_gdn_conv=1")
    assert pass_manager.config.fuse_gdn_conv
    for bad in ("fuse_everything=1", "fuse_gdn_conv=yes", "fuse_gdn_conv"):
        with pytest.raises(ValueError, match=f"pass switch '{bad}': expected name=0\\|1"):
            pass_manager.set_switches(bad)
