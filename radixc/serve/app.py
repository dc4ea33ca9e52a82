"""The OpenAI-compatible HTTP API over one AsyncEngine: /v1/completions, /v1/chat/completions, /v1/embeddings,
/v1/models, /health and /metrics (Prometheus text), as a Starlette app.

This side of the server does the text: chat templates, tokenizing prompts, detokenizing and streaming the
answers. Each HTTP request becomes one engine request per choice (its prompts x n), all joining the engine
process's single batch. A client that goes away, streaming or not, has its requests aborted at once. Every
failure is answered as an OpenAI error body; none stops the server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from radixc.engine.request import SamplingParams, TokenUpdate
from radixc.serve.chat import ChatTemplate, ChatTemplateError
from radixc.serve.engine import (
    AsyncEngine,
    EngineState,
    EngineUnavailable,
    RequestGroup,
    check_stream_interval,
)
from radixc.serve.messages import SHUTDOWN_ERROR, STATS_COUNTERS, ModelInfo
from radixc.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Prompts,
    parse_body,
)
from radixc.serve.text import TextStream

logger = logging.getLogger("radixc.serve")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI completions default; chat defaults to the rest of the context


def build_app(
    engine: AsyncEngine,
    model_name: str,
    chat_template: ChatTemplate | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    stream_interval: int = 1,
) -> Starlette:
    """The ASGI app serving `engine` as `model_name`; its lifespan starts and stops the engine process. A stream
    sends a chunk for a choice's first token, then every `stream_interval` tokens, and at its end."""
    check_stream_interval(stream_interval)
    api = _OpenAIServer(engine, model_name, chat_template, max_body_bytes, stream_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown()

    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return await _api_error(
        request, APIError(err.status_code, f"{request.url.path}: {err.detail}", code=code)
    )


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("request to %s failed", request.url.path)
    return await _api_error(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))


@dataclasses.dataclass
class _Choice:
    """One choice's progress: its tokens, its text so far and why it ended."""

    index: int
    text: TextStream | None  # None when the model has no tokenizer
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    def apply(self, update: TokenUpdate) -> str:
        """Take a step's update; the text it adds. A stop or EOS token ends the request but is not text."""
        self.token_ids.extend(update.token_ids)
        if self.text is None:
            self.finish_reason = update.finish_reason
            return ""
        shown = update.token_ids[:-1] if update.finish_reason == "stop" else update.token_ids
        piece = self.text.add(shown)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif update.finished:
            self.finish_reason = update.finish_reason
            piece += self.text.finish()
        return piece


class _EventStream(Response):
    """Server-sent events from `events`, over a request group that is closed however the stream ends: when the
    client disconnects, a watcher closes it at once (its engine requests abort and the stream runs out). One
    watcher task per request, where Starlette's StreamingResponse builds a task group and cancels through it:
    less host work per request when a burst of clients arrives together."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], group: RequestGroup):
        # no body, so no content-length: the headers as Starlette's own StreamingResponse sets them
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache"})
        self.events, self.group = events, group

    async def __call__(self, scope, receive, send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.group.close()

        watcher = asyncio.ensure_future(watch())
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.group.close()


class _OpenAIServer:
    """The route handlers: parse and check a request, run it on the engine, shape the OpenAI answer."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        chat_template: ChatTemplate | None,
        max_body_bytes: int,
        stream_interval: int,
    ):
        self.engine, self.model_name = engine, model_name
        self.chat_template, self.max_body_bytes = chat_template, max_body_bytes
        self.stream_interval = stream_interval
        self.created = int(time.time())

    async def completions(self, request: Request) -> Response:
        body = parse_body(CompletionRequest, await self._read_body(request))
        model = self._model(body.model, encoder=False)
        prompts = self._prompt_ids(model, body.prompt, "prompt")
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        return await self._generate(request, body, prompts, [max_tokens] * len(prompts), chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = parse_body(ChatCompletionRequest, await self._read_body(request))
        model = self._model(body.model, encoder=False)
        if self.chat_template is None:
            raise APIError(
                400,
                f"model {self.model_name!r} has no chat template (no chat_template in its "
                "tokenizer_config.json); use /v1/completions",
                code="no_chat_template",
            )
        if model.tokenizer is None:
            raise APIError(400, f"model {self.model_name!r} has no tokenizer for chat", code="no_tokenizer")
        try:
            text = self.chat_template.render([m.template_dict() for m in body.messages])
        except ChatTemplateError as err:
            raise APIError(400, str(err), param="messages", code="chat_template_error") from None
        # the template wrote the special tokens
        prompt = model.tokenizer.encode(text, add_special_tokens=False).ids
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, model.max_context_len - len(prompt))
        return await self._generate(request, body, [prompt], [max_tokens], chat=True)

    async def embeddings(self, request: Request) -> Response:
        body = parse_body(EmbeddingRequest, await self._read_body(request))
        model = self._model(body.model, encoder=True)
        prompts = self._prompt_ids(model, body.input, "input")
        try:
            pooled = await self.engine.encode(prompts, normalize=True)
        except ValueError as err:
            raise APIError(400, str(err), param="input", code="invalid_input") from None
        except EngineUnavailable as err:
            raise APIError(503, str(err), code="unavailable") from None
        data = []
        for index, row in enumerate(pooled):
            if body.encoding_format == "base64":
                embedding: Any = base64.b64encode(row.astype("<f4").tobytes()).decode()
            else:
                embedding = row.tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        num_tokens = sum(len(p) for p in prompts)
        usage = {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
        return JSONResponse({"object": "list", "data": data, "model": self.model_name, "usage": usage})

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "radixc"}
        if self.engine.model is not None:
            card["max_model_len"] = self.engine.model.max_context_len
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        state = self.engine.state
        body = {"status": state.value}
        if self.engine.error:
            body["error"] = self.engine.error
        return JSONResponse(body, status_code=200 if state is EngineState.READY else 503)

    async def metrics(self, request: Request) -> Response:
        try:
            stats = await self.engine.stats()
        except EngineUnavailable as err:
            raise APIError(503, str(err), code="unavailable") from None
        lines = []
        for field in dataclasses.fields(stats):
            kind = "counter" if field.name in STATS_COUNTERS else "gauge"
            name = f"radixc_{field.name}" + ("_total" if kind == "counter" else "")
            lines += [f"# TYPE {name} {kind}", f"{name} {getattr(stats, field.name)}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes max_body_bytes."""
        too_large = APIError(
            413, f"request body is larger than {self.max_body_bytes} bytes", code="body_too_large"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _model(self, model: str, encoder: bool) -> ModelInfo:
        """The served model once it can take this request: 400 for another model or the wrong endpoint, 503
        while it loads or stops."""
        if model != self.model_name:
            raise APIError(
                400,
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        served, reason = self.engine.model, self.engine.unavailable_reason()
        if reason is not None:
            raise APIError(503, reason, code="unavailable")
        if served.is_encoder != encoder:
            use = "/v1/embeddings" if served.is_encoder else "/v1/completions or /v1/chat/completions"
            kind = "an encoder-only" if served.is_encoder else "a generative"
            raise APIError(
                400, f"model {self.model_name!r} is {kind} model: use {use}", code="wrong_endpoint"
            )
        return served

    @staticmethod
    def _prompt_ids(model: ModelInfo, prompt: Prompts, param: str) -> list[list[int]]:
        """Token id lists of the request's prompts (strings through the model's tokenizer)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if any(isinstance(p, str) for p in prompt) and model.tokenizer is None:
            raise APIError(
                400, "this model has no tokenizer: send token ids", param=param, code="no_tokenizer"
            )
        return [model.tokenizer.encode(p).ids if isinstance(p, str) else list(p) for p in prompt]

    async def _generate(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        max_tokens: list[int],
        chat: bool,
    ) -> Response:
        """Run every choice of the request on the engine, streamed as SSE or answered in one body."""
        n = body.n or 1
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        tokenizer = self.engine.model.tokenizer
        if stop and tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer; use stop_token_ids", param="stop")
        choice_prompts = [p for p in prompts for _ in range(n)]
        params = [
            _sampling_params(body, max_tokens[i // n], seed_offset=i % n) for i in range(len(choice_prompts))
        ]
        try:
            group = await self.engine.add(choice_prompts, params, self.stream_interval if body.stream else 1)
        except ValueError as err:
            raise APIError(
                400, str(err), param="messages" if chat else "prompt", code="invalid_prompt"
            ) from None
        except EngineUnavailable as err:
            raise APIError(503, str(err), code="unavailable") from None
        choices = [_Choice(i, TextStream(tokenizer, stop) if tokenizer else None) for i in range(len(params))]
        reply = _Reply(
            id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            model=self.model_name,
            chat=chat,
            num_prompt_tokens=sum(len(p) for p in prompts),
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(_events(group, choices, reply, include_usage), group)
        return await _until_disconnect(request, _collect(group, choices, reply), group)


def _sampling_params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, seed_offset: int
) -> SamplingParams:
    """The engine's SamplingParams for one choice; choice j of a prompt samples with seed + j, so the n choices
    differ and the whole answer is reproducible."""
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=-1 if body.top_k in (None, 0) else body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=None if body.seed is None else body.seed + seed_offset,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
        )
    except ValueError as err:
        raise APIError(400, str(err), code="invalid_value") from None


@dataclasses.dataclass
class _Reply:
    """What every chunk or body of one answer shares."""

    id: str
    model: str
    chat: bool
    num_prompt_tokens: int
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        # a streamed chunk is this prefix, one choice and "]}": the envelope is encoded once per answer
        self._chunk_prefix = "data: " + _json(self.envelope([], final=False)).removesuffix("]}")

    def envelope(self, choices: list[dict[str, Any]], final: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion" if final else "chat.completion.chunk"
        else:
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def choice(self, choice: _Choice, text: str) -> dict[str, Any]:
        """A choice of the unstreamed body."""
        entry: dict[str, Any] = {
            "index": choice.index,
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }
        if self.chat:
            entry["message"] = {"role": "assistant", "content": text}
        else:
            entry["text"] = text
        return entry

    def chunk(self, choice: _Choice, text: str) -> str:
        """The SSE event of a choice's new text, written around the envelope encoded once: a stream sends one
        per choice and step, so only the text and the finish reason are encoded here."""
        content = f'"delta":{{"content":{_json(text)}}}' if self.chat else f'"text":{_json(text)}'
        reason = "null" if choice.finish_reason is None else _json(choice.finish_reason)
        return (
            f'{self._chunk_prefix}{{"index":{choice.index},"logprobs":null,'
            f'"finish_reason":{reason},{content}}}]}}\n\n'
        )

    def usage(self, choices: Sequence[_Choice]) -> dict[str, int]:
        completion = sum(len(c.token_ids) for c in choices)
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.num_prompt_tokens + completion,
        }


def _engine_error(update: TokenUpdate) -> APIError:
    status = 503 if update.error == SHUTDOWN_ERROR else 500
    return APIError(status, f"request failed: {update.error}", code="engine_error")


def _take(group: RequestGroup, choice: _Choice, update: TokenUpdate) -> str:
    """Apply an update to its choice; the text it adds. A stop string met before the request ended stops it."""
    piece = choice.apply(update)
    if choice.text is not None and choice.text.stopped and not update.finished:
        group.stop(choice.index)
    return piece


async def _collect(group: RequestGroup, choices: list[_Choice], reply: _Reply) -> Response:
    """The whole answer in one body, once every choice ended."""
    texts = [""] * len(choices)
    async for updates in group:
        for index, update in updates:
            if update.error is not None:
                raise _engine_error(update)
            texts[index] += _take(group, choices[index], update)
    body = reply.envelope([reply.choice(c, t) for c, t in zip(choices, texts)], final=True)
    body["usage"] = reply.usage(choices)
    return JSONResponse(body)


async def _until_disconnect(request: Request, answer, group: RequestGroup) -> Response:
    """Await `answer`, unless the client disconnects first: then its requests are aborted at once."""
    task = asyncio.ensure_future(answer)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        group.close()
    if task.cancelled():
        logger.info("client of %s disconnected; its requests were aborted", request.url.path)
        return Response(status_code=499)
    return task.result()


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _sse(data: dict[str, Any]) -> str:
    return f"data: {_json(data)}\n\n"


async def _events(
    group: RequestGroup, choices: list[_Choice], reply: _Reply, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a chunk for each choice that got text or ended since the last send (every step's,
    unless the stream fell behind the engine), all sent at once; then usage, then [DONE]."""
    if reply.chat:
        opening = [
            {
                "index": c.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for c in choices
        ]
        yield _sse(reply.envelope(opening, final=False))
    failed = False
    async for updates in group:
        events = []
        for index, update in updates:
            if update.error is not None:
                events.append(_sse(_engine_error(update).body()))
                failed = True
                break
            choice = choices[index]
            piece = _take(group, choice, update)
            if piece or choice.finish_reason is not None:
                events.append(reply.chunk(choice, piece))
        if events:
            yield "".join(events)
        if failed:
            break
    if include_usage and not failed:
        yield _sse({**reply.envelope([], final=False), "usage": reply.usage(choices)})
    yield "data: [DONE]\n\n"
