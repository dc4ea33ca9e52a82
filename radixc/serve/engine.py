"""AsyncEngine: the server process's handle on the engine process, shared by the coroutines of every connection.

Requests from all connections join the engine's one continuous batch: handlers send commands (add, abort, encode,
stats) over the channel, and one reader task on the event loop takes each step's updates (one message for every
request) and hands them to their RequestGroups. The LLM lives only in the engine process
(`radixc.serve.engine_process`); this side keeps the model's tokenizer and limits (`model`) for the HTTP layer.

The engine process is started with multiprocessing's forkserver, the forkserver having imported radixc once:
forking the server itself could copy state of its threads, spawning anew would pay the import (~8 s of CPU
here) for every engine, and the forkserver pays it once per server process. Where CUDA is available it is
spawned instead (`engine_start_method`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import multiprocessing
import socket
from collections.abc import Callable, Sequence

import numpy as np
import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams, TokenUpdate
from radixc.serve.channel import AsyncChannel
from radixc.serve.engine_process import run_engine
from radixc.serve.messages import (
    SHUTDOWN_ERROR,
    AbortRequests,
    AddRequests,
    Encode,
    EngineStats,
    LoadFailed,
    ModelInfo,
    QueryStats,
    Ready,
    Reply,
    Shutdown,
    StepUpdates,
)

logger = logging.getLogger("radixc.serve")

STOP_GRACE_S = 5.0  # how long a stopping engine process may take to exit before it is terminated


def engine_start_method() -> str:
    """How to start engine processes here: "forkserver", or "spawn" where CUDA is available. Importing radixc
    imports Inductor, whose import calls `torch.cuda.is_available()`; on a CUDA machine that initializes CUDA
    in the forkserver, and no process forked from it can use CUDA after that."""
    return "spawn" if torch.cuda.is_available() else "forkserver"


class EngineState(str, enum.Enum):
    LOADING = "loading"  # starting the engine process, building the LLM and compiling its first steps
    READY = "ready"
    FAILED = "failed"  # the LLM could not be built, or the engine process died; `error` says why
    STOPPING = "stopping"  # shutting down: no new requests


class EngineUnavailable(RuntimeError):
    """The engine is not serving: still loading, failed, or shutting down."""


def check_stream_interval(stream_interval: int) -> None:
    """ValueError unless `stream_interval` (tokens per streamed chunk) is at least 1."""
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be at least 1, not {stream_interval}")


class RequestGroup:
    """The choices of one HTTP request (its prompts x n), each an engine request; iterate for their updates.

    Each iteration yields the updates that are due: a list of (choice, TokenUpdate), at most one per choice,
    that update merging every step the consumer had not taken yet, until every choice ended. So a consumer that
    falls behind the engine catches up in one pass instead of paying its per-update costs (detokenizing,
    encoding, sending) once per step. A choice's update is due at once with `stream_interval` 1; with n > 1 only
    at its first token, once n tokens wait, and at its end: fewer, larger chunks, for less host work per token.
    `stop(choice)` ends one early (a stop string matched), `close()` every unfinished one (the client left):
    both free the engine's pages at once.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[int], stream_interval: int = 1):
        self._engine = engine
        self.request_ids = request_ids  # the engine request of each choice
        self.stream_interval = stream_interval
        self._pending: dict[int, TokenUpdate] = {}  # choice -> its updates not yet taken, merged
        self._due: set[int] = set()  # choices whose pending update is to be taken now
        self._arrived: asyncio.Future | None = None  # what the consumer awaits while nothing is due
        self._unfinished = set(range(len(request_ids)))
        self._started: set[int] = set()  # choices whose first token was taken

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> list[tuple[int, TokenUpdate]]:
        while self._unfinished:
            if not self._due:
                self._arrived = asyncio.get_running_loop().create_future()
                try:
                    await self._arrived
                finally:
                    self._arrived = None
                continue  # woken by an update that is due, or by close()
            due, self._due = self._due, set()
            taken = [(c, self._pending.pop(c)) for c in sorted(due)]
            # a choice stopped early may still have had updates on the way
            updates = [(c, u) for c, u in taken if c in self._unfinished]
            for choice, update in updates:
                self._started.add(choice)
                if update.finished:
                    self._unfinished.discard(choice)
            if updates:
                return updates
        raise StopAsyncIteration

    def stop(self, choice: int) -> None:
        """End one choice now (its engine request is aborted; no more updates come for it)."""
        if choice in self._unfinished:
            self._unfinished.discard(choice)
            self._engine._abort([self.request_ids[choice]])

    def close(self) -> None:
        """End every unfinished choice now; a consumer waiting for updates stops iterating."""
        if self._unfinished:
            self._engine._abort([self.request_ids[c] for c in sorted(self._unfinished)])
            self._unfinished.clear()
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    def _put(self, choice: int, update: TokenUpdate) -> None:
        """Take one step's update of a choice, merged into what is still pending."""
        pending = self._pending.get(choice)
        if pending is None:
            self._pending[choice] = pending = update
        else:
            pending.token_ids.extend(update.token_ids)
            pending.finish_reason, pending.error = update.finish_reason, update.error
        if pending.finished or choice not in self._started or len(pending.token_ids) >= self.stream_interval:
            self._due.add(choice)
            if self._arrived is not None and not self._arrived.done():
                self._arrived.set_result(None)


class AsyncEngine:
    """Starts and stops the engine process and talks to it from the event loop.

    make_llm runs in the engine process, so it must pickle: a module-level function or a `functools.partial`
    of LLM. on_failure(message) runs in the event loop when the model fails to load or the engine process dies
    (a server exits on it); by then every waiting request got its error. engine_cpus keeps the engine process
    on those CPUs (radixc.serve.affinity), with at most one torch thread per CPU.
    """

    def __init__(
        self,
        make_llm: Callable[[], LLM],
        on_failure: Callable[[str], None] | None = None,
        engine_cpus: Sequence[int] | None = None,
    ):
        self._make_llm = make_llm
        self._on_failure = on_failure
        self._engine_cpus = None if engine_cpus is None else list(engine_cpus)
        self.state = EngineState.LOADING
        self.error: str | None = None  # why the engine FAILED
        self.model: ModelInfo | None = None  # set once READY
        self._process: multiprocessing.process.BaseProcess | None = None
        self._channel: AsyncChannel | None = None
        self._starting: asyncio.Future | None = None  # the engine process's start, in a thread
        self._task: asyncio.Task | None = None  # reads what the engine process says
        self._live: dict[int, tuple[RequestGroup, int]] = {}  # running request id -> (its group, choice)
        self._replies: dict[int, asyncio.Future] = {}  # command number -> the future its reply settles
        self._next_id = 0  # of requests and of commands that want a reply

    @property
    def pid(self) -> int | None:
        """The engine process's id, once it started."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the engine process (from the event loop that will await this engine); returns at once."""
        if self._task is not None:
            raise RuntimeError("AsyncEngine: already started")
        ours, theirs = socket.socketpair()
        method = engine_start_method()
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(["radixc.serve.engine_process"])
        log_level = logging.getLogger("radixc").getEffectiveLevel()
        self._process = context.Process(
            target=run_engine,
            args=(self._make_llm, theirs, self._engine_threads(), log_level, self._engine_cpus),
            name="radixc-engine",
            daemon=True,
        )
        # the first start waits for the forkserver's import of radixc (spawn: each does): off the event loop, which
        # answers 503
        self._starting = asyncio.ensure_future(asyncio.to_thread(self._process.start))
        self._starting.add_done_callback(lambda _: theirs.close())
        self._task = asyncio.get_running_loop().create_task(self._run(ours))

    def _engine_threads(self) -> int:
        """This process's torch thread count, at most one per CPU of the engine's own."""
        threads = torch.get_num_threads()
        return threads if self._engine_cpus is None else min(threads, len(self._engine_cpus))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Fail every unfinished request ("server shutting down") and stop the engine process: it gets
        `timeout` seconds to finish its step (none while it still loads), then is killed."""
        if self._task is None:
            return
        loading = self.state is EngineState.LOADING
        if self.state is not EngineState.FAILED:
            self.state = EngineState.STOPPING  # refuse new requests; those sent before Shutdown get an answer
        await asyncio.wait({self._starting}, timeout=timeout)
        if self._channel is not None and not loading:
            self._channel.send(Shutdown())
            await asyncio.wait({self._task}, timeout=timeout)
        await self._stop_process(grace=0.0 if loading else STOP_GRACE_S)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._fail_pending(SHUTDOWN_ERROR)

    async def add(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams], stream_interval: int = 1
    ) -> RequestGroup:
        """Queue one engine request per (prompt, params); ValueError (none queued) when one can never run.
        stream_interval: see RequestGroup."""
        check_stream_interval(stream_interval)
        self._check_ready()
        request_ids = list(range(self._next_id, self._next_id + len(prompts)))
        self._next_id += len(prompts)
        group = RequestGroup(self, request_ids, stream_interval)
        for choice, request_id in enumerate(request_ids):
            self._live[request_id] = (group, choice)
        try:
            await self._ask(lambda number: AddRequests(number, request_ids, list(prompts), list(params)))
        except asyncio.CancelledError:  # the handler went away; the engine admits them all the same
            group.close()
            raise
        except Exception:  # refused: none was admitted
            for request_id in request_ids:
                self._live.pop(request_id, None)
            raise
        return group

    async def encode(self, prompts: Sequence[list[int]], normalize: bool) -> np.ndarray:
        """Pooled embeddings `[n, hidden]` (float32) of an encoder model, computed between two steps."""
        self._check_ready()
        return await self._ask(lambda number: Encode(number, list(prompts), normalize))

    async def stats(self) -> EngineStats:
        """The engine's counters and pools, as of its last step."""
        self._check_ready()
        return await self._ask(QueryStats)

    def unavailable_reason(self) -> str | None:
        """Why the engine takes no requests now (None when READY)."""
        return {
            EngineState.READY: None,
            EngineState.LOADING: "the model is still loading; retry shortly",
            EngineState.FAILED: self.error,
            EngineState.STOPPING: "the server is shutting down",
        }[self.state]

    def _check_ready(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise EngineUnavailable(reason)

    async def _ask(self, command: Callable[[int], object]):
        """Send the command numbered for its reply, and await the reply's result."""
        number = self._next_id
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._replies[number] = future
        self._channel.send(command(number))
        try:
            return await future
        finally:
            self._replies.pop(number, None)

    def _abort(self, request_ids: list[int]) -> None:
        for request_id in request_ids:
            self._live.pop(request_id, None)
        if self._channel is not None and self.state in (EngineState.READY, EngineState.STOPPING):
            self._channel.send(AbortRequests(request_ids))

    async def _run(self, sock: socket.socket) -> None:
        """Once the engine process started, dispatch what it says until it closes the channel."""
        try:
            await asyncio.shield(self._starting)
            self._channel = await AsyncChannel.open(sock)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as err:
            sock.close()
            self._fail(f"the engine process did not start: {type(err).__name__}: {err}")
            return
        try:
            while True:
                self._dispatch(await self._channel.receive())
        except EOFError:
            pass
        except Exception as err:  # a bug here must not leave every waiting client hanging
            logger.exception("engine messages failed")
            self._fail(f"the server failed to read the engine: {type(err).__name__}: {err}")
        finally:
            self._channel.close()
        if self.state is not EngineState.STOPPING:
            await self._stop_process(grace=STOP_GRACE_S)
            if self.error is None:
                self._fail(f"the engine process exited unexpectedly (exit code {self._process.exitcode})")

    def _dispatch(self, message) -> None:
        if isinstance(message, StepUpdates):
            for request_id, token_ids, finish_reason, error in message.updates:
                ended = finish_reason is not None or error is not None
                entry = self._live.pop(request_id, None) if ended else self._live.get(request_id)
                if entry is not None:  # else its group closed it already
                    entry[0]._put(entry[1], TokenUpdate(request_id, token_ids, finish_reason, error))
        elif isinstance(message, Reply):
            future = self._replies.pop(message.reply_to, None)
            if future is None or future.done():  # its handler was cancelled
                return
            if message.error is None:
                future.set_result(message.result)
            else:
                future.set_exception((ValueError if message.invalid else RuntimeError)(message.error))
        elif isinstance(message, Ready):
            self.model = message.model
            if self.state is EngineState.LOADING:  # not already shutting down
                self.state = EngineState.READY
            logger.info("engine ready (process %d)", self._process.pid)
        elif isinstance(message, LoadFailed):
            self._fail(f"the model failed to load: {message.error}")
        else:
            raise TypeError(f"AsyncEngine: unknown message {message!r}")

    def _fail(self, error: str) -> None:
        """The engine cannot serve again: answer everything waiting with `error` and tell the server."""
        logger.error("%s", error)
        self.state, self.error = EngineState.FAILED, error
        self._fail_pending(error)
        if self._on_failure is not None:
            self._on_failure(error)

    def _fail_pending(self, error: str) -> None:
        """Every running request gets `error` as its last update; every awaited reply EngineUnavailable."""
        live, self._live = self._live, {}
        for request_id, (group, choice) in live.items():
            group._put(choice, TokenUpdate(request_id, [], error=error))
        replies, self._replies = self._replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(EngineUnavailable(error))

    async def _stop_process(self, grace: float) -> None:
        """Wait `grace` seconds for the engine process to exit, then kill it (it ignores SIGTERM: its exit is
        this process's to decide)."""
        process = self._process
        if process is None or process.pid is None:
            return
        await asyncio.to_thread(process.join, grace)
        if process.exitcode is None:
            if grace:
                logger.warning("engine process %d still running after %.0f s; killing it", process.pid, grace)
            process.kill()
            await asyncio.to_thread(process.join, STOP_GRACE_S)
