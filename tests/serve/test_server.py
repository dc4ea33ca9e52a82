"""The OpenAI-compatible server against the official `openai` client: greedy completions and chat equal the
offline LLM's tokens, streams add up to the unstreamed text, 64 concurrent streams share decode steps, a client
that leaves frees its pages, and every bad request gets its OpenAI-shaped error."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import types

import httpx
import pytest
import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.serve import AsyncEngine, ChatTemplate, build_app
from radixc.serve.cli import build_parser

openai = pytest.importorskip("openai", reason="the official client is the peer these tests speak to")

MODEL = "tiny-llama-chat"
MAX_BODY_BYTES = 64 * 1024


LLM_OPTIONS = dict(compile=False, page_size=4, max_batch_size=64, max_context_len=192, progress=False)


@pytest.fixture(scope="module")
def served(checkpoint, serve_harness) -> types.SimpleNamespace:
    """A server on the checkpoint, an offline LLM on the same checkpoint, and an openai client."""
    engine = AsyncEngine(functools.partial(LLM, str(checkpoint), **LLM_OPTIONS))
    app = build_app(engine, MODEL, ChatTemplate.from_checkpoint(checkpoint), max_body_bytes=MAX_BODY_BYTES)
    thread = serve_harness.ServerThread(app).start()
    client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0, timeout=60)
    offline = LLM(str(checkpoint), **LLM_OPTIONS)
    yield types.SimpleNamespace(engine=engine, url=thread.url, client=client, offline=offline)
    client.close()
    thread.stop()


def offline_tokens(llm: LLM, prompts: list[list[int]], max_tokens: int, **params) -> list[list[int]]:
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=max_tokens, ignore_eos=True, **params))
    return [o.token_ids for o in outputs]


def random_prompts(count: int, seed: int, low: int = 1, high: int = 24) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, 384, (int(n),), generator=gen).tolist()
        for n in torch.randint(low, high + 1, (count,), generator=gen)
    ]


def ids_of(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split()]


def test_greedy_completions_and_chat_equal_offline_tokens_with_usage(served, serve_harness):
    prompts = random_prompts(3, seed=1)
    out = served.client.completions.create(
        model=MODEL,
        prompt=[serve_harness.words(p) for p in prompts],
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    expected = offline_tokens(served.offline, prompts, 7)
    assert [ids_of(c.text) for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.prompt_tokens == sum(map(len, prompts)) and out.usage.completion_tokens == 21

    token_prompt = served.client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ids_of(token_prompt.choices[0].text) == expected[0]

    messages = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12 w13 w14"}]
    chat = served.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    [want] = offline_tokens(served.offline, [[2, 10, 11, 3, 12, 13, 14, 5]], 6)  # the template's words
    assert chat.choices[0].message.role == "assistant"
    assert ids_of(chat.choices[0].message.content) == want
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (8, 6)
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_streamed_chunks_concatenate_to_the_unstreamed_text(served, serve_harness):
    prompt = serve_harness.words(random_prompts(1, seed=2)[0])
    sampled = dict(
        model=MODEL, max_tokens=9, temperature=0.9, top_p=0.9, seed=7, n=3, extra_body={"top_k": 50}
    )
    whole = served.client.completions.create(prompt=prompt, **sampled)
    streamed = [""] * 3
    finish = [None] * 3
    usage = None
    for chunk in served.client.completions.create(
        prompt=prompt, stream=True, stream_options={"include_usage": True}, **sampled
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason or finish[choice.index]
        usage = chunk.usage or usage
    texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert streamed == texts
    assert len(set(texts)) > 1, "the n choices sample with different seeds"
    assert finish == [c.finish_reason for c in sorted(whole.choices, key=lambda c: c.index)]
    assert usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "w40 w41"}]
    chat = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    pieces = [
        c.choices[0].delta.content or ""
        for c in served.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == chat.choices[0].message.content


def test_a_stream_interval_sends_the_same_text_in_fewer_chunks(served, checkpoint, serve_harness):
    engine = AsyncEngine(functools.partial(LLM, str(checkpoint), **LLM_OPTIONS))
    app = build_app(engine, MODEL, stream_interval=3)
    thread = serve_harness.ServerThread(app).start()
    prompt = serve_harness.words(random_prompts(1, seed=4)[0])
    greedy = dict(model=MODEL, prompt=prompt, max_tokens=13, temperature=0, extra_body={"ignore_eos": True})
    try:
        with openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0) as client:
            pieces = [
                c.choices[0].text for c in client.completions.create(stream=True, **greedy) if c.choices
            ]
    finally:
        thread.stop()
    assert "".join(pieces) == served.client.completions.create(**greedy).choices[0].text
    # the first token at once (a chunk of 3 would mean it waited), then chunks of 3 or more: at most
    # 1 + ceil(12 / 3) chunks, where every token was one before
    assert len(ids_of(pieces[0])) < 3 and 2 <= len(pieces) <= 5, [ids_of(p) for p in pieces]
    with pytest.raises(ValueError, match="stream_interval must be at least 1, not 0"):
        build_app(engine, MODEL, stream_interval=0)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_the_command_line_refuses_a_stream_interval_below_one(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["tiny-llama", "--stream-interval", value])
    assert exit_info.value.code == 2
    assert f"expected a whole number of at least 1, not {value!r}" in capsys.readouterr().err


def test_stop_strings_and_stop_token_ids_end_the_text_before_them(served, serve_harness):
    prompt = random_prompts(1, seed=3)[0]
    [tokens] = offline_tokens(served.offline, [prompt], 10)
    full = serve_harness.words(tokens)
    stop = f" w{tokens[3]}"
    cut = full[: full.find(stop)]
    kwargs = dict(
        model=MODEL,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        stop=[stop, "never"],
        extra_body={"ignore_eos": True},
    )
    out = served.client.completions.create(**kwargs)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(c.choices[0].text for c in served.client.completions.create(stream=True, **kwargs))
    assert streamed == cut
    by_id = served.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body={"stop_token_ids": [tokens[3]]}
    )
    first = tokens.index(tokens[3])
    assert by_id.choices[0].text == serve_harness.words(tokens[:first])  # the stop token itself is not text
    assert (by_id.choices[0].finish_reason, by_id.usage.completion_tokens) == ("stop", first + 1)


def test_64_concurrent_streaming_clients_get_offline_tokens_and_share_decode_steps(served, serve_harness):
    prompts = random_prompts(64, seed=4, high=40)
    before = serve_harness.metrics(served.url)

    async def one(client: openai.AsyncOpenAI, prompt: list[int]) -> list[int]:
        text = ""
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            text += chunk.choices[0].text
        return ids_of(text)

    async def all_clients() -> list[list[int]]:
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), timeout=120)

    got = asyncio.run(all_clients())
    assert got == offline_tokens(served.offline, prompts, 12)
    after = serve_harness.metrics(served.url)
    steps = after["radixc_steps_total"] - before["radixc_steps_total"]
    tokens = after["radixc_generated_tokens_total"] - before["radixc_generated_tokens_total"]
    print(
        f"64 clients x 12 tokens: {tokens:.0f} tokens in {steps:.0f} steps, "
        f"at most {after['radixc_max_tokens_in_step']:.0f} in one"
    )
    assert tokens == 64 * 12
    assert steps < tokens / 8, "the clients' requests did not share steps"
    assert after["radixc_max_tokens_in_step"] >= 32
    assert after["radixc_step_seconds_total"] > before["radixc_step_seconds_total"]
    model_steps = sum(
        after[f"radixc_{mode}_steps_total"] - before[f"radixc_{mode}_steps_total"]
        for mode in ("extend", "decode")
    )
    assert model_steps == steps, "every engine step ran one model step, counted by mode"
    assert after["radixc_decode_seconds_total"] > before["radixc_decode_seconds_total"]


def test_client_leaving_mid_stream_frees_its_pages_at_once(served, serve_harness):
    aborted = serve_harness.metrics(served.url)["radixc_requests_aborted_total"]
    body = {
        "model": MODEL,
        "prompt": [5, 6, 7, 8, 9],
        "max_tokens": 150,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{served.url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            received = [line for _, line in zip(range(6), response.iter_lines()) if line]
            assert all(line.startswith("data: {") for line in received)
    deadline = time.monotonic() + 10
    while (stats := serve_harness.metrics(served.url))["radixc_running_requests"]:
        assert time.monotonic() < deadline, "the abandoned request still runs"
        time.sleep(0.01)
    assert stats["radixc_requests_aborted_total"] == aborted + 1
    assert stats["radixc_free_kv_pages"] + stats["radixc_cached_kv_pages"] == stats["radixc_kv_pages"]
    assert stats["radixc_free_request_rows"] == stats["radixc_request_rows"]


def long_prompt() -> str:
    return " ".join(["w7"] * 200)


BAD_REQUESTS = [
    # (path, body, status, param, code)
    ("/v1/completions", b'{"model": "tiny-llama-chat", "prompt": ', 400, None, "invalid_json"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "w5", "max_tokens": -3},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "w5", "max_tokens": "ten"},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "w5", "temperature": 2.5},
        400,
        "temperature",
        "invalid_value",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "w5", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "w5", "n": 0}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "w5", "stream": "yes"}, 400, "stream", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": [3, -1]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": [3, 100000]}, 400, "prompt", "invalid_prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": long_prompt()}, 400, "prompt", "invalid_prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "w5", "echo": True}, 400, "echo", "unsupported_parameter"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "w5"}, 400, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "robot", "content": "w5"}]},
        400,
        "messages.0.role",
        "invalid_value",
    ),
    ("/v1/embeddings", {"model": MODEL, "input": "w5"}, 400, None, "wrong_endpoint"),
    ("/v1/completions", {"model": MODEL, "prompt": "w5 " * 40000}, 413, None, "body_too_large"),
    ("/v1/nothing", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize(
    "path, body, status, param, code",
    BAD_REQUESTS,
    ids=[f"{r[2]}-{r[4]}-{i}" for i, r in enumerate(BAD_REQUESTS)],
)
def test_bad_requests_get_their_status_and_openai_error_body(served, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{served.url}{path}", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{served.url}/health").status_code == 200  # the server lives on


def test_openai_client_raises_bad_request_with_the_message(served):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        served.client.completions.create(model=MODEL, prompt="w5", temperature=-1)
