"""The q/k-norm + rope fusion (an Inductor pattern): both norms fold into one op, and it leaves alone a rope whose
inputs are not both per-head norms with the same eps."""

from __future__ import annotations

import pytest
import torch


def test_both_norms_fold_into_one_qk_norm_rope_op(ph):
    torch.manual_seed(3)
    model = ph.RopeAttention(qk_norm=True)
    expected = ph.run_attention(model, compiled=False)[0]
    outputs, history, code, _ = ph.run_attention(model, compiled=True, fuse_rope_kv_store=False)
    assert [h["fuse_qk_norm_rope"] for h in history] == [1, 1]
    assert "radixc.qk_norm_rope.default(" in code and "radixc.rms_norm" not in code
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["only q normed", "different eps"])
def test_a_rope_without_two_matching_norms_is_left_alone(ph, variant):
    torch.manual_seed(3)
    model = ph.HalfNormed(qk_norm=True) if variant == "only q normed" else ph.RopeAttention(True, q_eps=1e-5)
    expected = ph.run_attention(model, compiled=False)[0]
    outputs, history, code, _ = ph.run_attention(model, compiled=True)
    assert all(h["fuse_qk_norm_rope"] == 0 for h in history)
    assert "torch.ops.radixc.rms_norm.default(" in code and "qk_norm_rope" not in code
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
