"""The LM head's float32 cast folded into its decode GEMV: compiled half-precision decode gives exactly the logits
of the graph with the cast kernel (the GEMV rounds to the model's dtype, then widens), one rewrite per decode
graph; the Triton kernels run under the interpreter."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import radixc
from radixc.models.presets import build_preset
from radixc.passes.fuse_linear_cast import FuseLinearCast
from radixc.passes.lower_linear import LowerSmallBatchLinear

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="runs the kernels on CPU tensors under the interpreter; on a GPU the CUDA-graph tests decode through it",
    ),
]


def _compiled_decode(ph, model, prompts, fold: bool):
    manager = radixc.passes.install()
    manager.history.clear()
    torch._dynamo.reset()
    with (
        ph.switches(fuse_linear_cast=fold),
        mock.patch.object(LowerSmallBatchLinear, "device_types", ("cpu",)),
        torch._inductor.config.patch(fx_graph_cache=False),
    ):
        logits = ph.greedy_decode_logits(model, "triton", True, prompts, steps=3)
    return logits, list(manager.history)


# decode-graph rewrites: the LM head, and Gemma 2's o_proj and down_proj, whose outputs go to their post-norms
FOLDED = {"tiny-llama": 1, "tiny-gemma2": 5}


# one preset per row path of the GEMV (one row: multiply-reduce; three: tl.dot), to keep CI short
@pytest.mark.parametrize(("preset", "batch"), [("tiny-llama", 3), ("tiny-gemma2", 1)])
def test_folded_cast_gives_the_logits_of_the_cast_kernel(ph, preset, batch):
    """float16 (the interpreter's bfloat16 tl.dot is wrong); gemma2 soft-caps the widened logits, and its
    post-norms read o_proj's and down_proj's outputs widened."""
    model = build_preset(preset, dtype=torch.float16, seed=4)
    prompts = [[5, 9, 2, 7], [4, 6], [11, 12, 13]][:batch]
    expected, unfolded_history = _compiled_decode(ph, model, prompts, fold=False)
    got, history = _compiled_decode(ph, model, prompts, fold=True)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    assert [counts[FuseLinearCast.name] for counts in history] == [0, FOLDED[preset]]
    assert all(FuseLinearCast.name not in counts for counts in unfolded_history)


def test_a_float32_model_has_no_cast_to_fold(ph):
    model = build_preset("tiny-llama", dtype=torch.float32, seed=4)
    _, history = _compiled_decode(ph, model, [[5, 9, 2]], fold=True)
    assert [counts[FuseLinearCast.name] for counts in history] == [0, 0]


def test_on_by_default():
    assert radixc.passes.PassConfig().fuse_linear_cast
