"""AsyncEngine: one LLM driven by its own thread, fed by the coroutines of every HTTP connection.

Requests from all connections join the same continuous batch: handlers queue commands (add, abort, encode), the
engine thread applies them between steps, runs `LLM.step()` and hands each step's token updates back to the
event loop in one callback. Nothing but the engine thread touches the LLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import queue
import threading
from collections.abc import Callable, Sequence

import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams, TokenUpdate

logger = logging.getLogger("radixc.serve")


class EngineState(str, enum.Enum):
    LOADING = "loading"  # building the LLM and compiling its first steps
    READY = "ready"
    FAILED = "failed"  # the LLM could not be built; load_error says why
    STOPPING = "stopping"  # shutting down: no new requests


SHUTDOWN_ERROR = "server shutting down"  # the error of requests still running when the engine stops


class EngineUnavailable(RuntimeError):
    """The engine is not serving: still loading, failed to load, or shutting down."""


@dataclasses.dataclass
class EngineStats:
    """Counters of the engine thread, for /metrics: steps shared by many requests show batching at work."""

    steps: int = 0
    generated_tokens: int = 0
    max_tokens_in_step: int = 0  # the most requests that got a token in one step
    requests_added: int = 0
    requests_aborted: int = 0
    running_requests: int = 0


class RequestGroup:
    """The choices of one HTTP request (its prompts x n), each an engine request; iterate for their updates.

    Each iteration yields what arrived since the last one: a list of (choice, TokenUpdate), at most one per
    choice, that update merging every step the consumer had not taken yet, until every choice ended. So a
    consumer that falls behind the engine catches up in one pass instead of paying its per-update costs
    (detokenizing, encoding, sending) once per step. `stop(choice)` ends one early (a stop string matched),
    `close()` every unfinished one (the client left): both free the engine's pages at once.
    """

    def __init__(self, engine: AsyncEngine, num_choices: int):
        self._engine = engine
        self._pending: dict[int, TokenUpdate] = {}  # choice -> its updates not yet taken, merged
        self._arrived: asyncio.Future | None = None  # what the consumer awaits while nothing is pending
        self._unfinished = set(range(num_choices))
        self.request_ids: list[int] = []  # engine request id of each choice; written by the engine thread

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> list[tuple[int, TokenUpdate]]:
        while self._unfinished:
            if not self._pending:
                self._arrived = self._engine._loop.create_future()
                try:
                    await self._arrived
                finally:
                    self._arrived = None
            pending, self._pending = self._pending, {}
            # a choice stopped early may still have had updates on the way
            updates = [(c, u) for c, u in pending.items() if c in self._unfinished]
            for choice, update in updates:
                if update.finished:
                    self._unfinished.discard(choice)
            if updates:
                return updates
        raise StopAsyncIteration

    def stop(self, choice: int) -> None:
        """End one choice now (its engine request is aborted; no more updates come for it)."""
        if choice in self._unfinished:
            self._unfinished.discard(choice)
            self._engine._submit(_Abort(self, [choice]))

    def close(self) -> None:
        """End every unfinished choice now."""
        if self._unfinished:
            self._engine._submit(_Abort(self, sorted(self._unfinished)))
            self._unfinished.clear()

    def _put(self, choice: int, update: TokenUpdate) -> None:
        """Take one step's update of a choice (in the event loop), merged into what is still pending."""
        pending = self._pending.get(choice)
        if pending is None:
            self._pending[choice] = update
        else:
            pending.token_ids.extend(update.token_ids)
            pending.finish_reason, pending.error = update.finish_reason, update.error
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)


@dataclasses.dataclass
class _Add:
    group: RequestGroup
    prompts: list[list[int]]
    params: list[SamplingParams]
    admitted: asyncio.Future


@dataclasses.dataclass
class _Abort:
    group: RequestGroup
    choices: list[int]


@dataclasses.dataclass
class _Encode:
    prompts: list[list[int]]
    normalize: bool
    done: asyncio.Future


class _Stop:
    pass


class AsyncEngine:
    """Owns the engine thread: builds the LLM there (`make_llm`), warms it up, then serves commands and steps.

    on_load_failure(message) runs in the event loop when make_llm raises (a server exits on it).
    """

    def __init__(self, make_llm: Callable[[], LLM], on_load_failure: Callable[[str], None] | None = None):
        self._make_llm = make_llm
        self._on_load_failure = on_load_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.state = EngineState.LOADING
        self.load_error: str | None = None
        self.llm: LLM | None = None  # set once READY; only the engine thread may call it
        self.stats = EngineStats()

    def start(self) -> None:
        """Start the engine thread (from the event loop that will await this engine)."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine: already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="radixc-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Fail every unfinished request ("server shutting down") and stop the engine thread."""
        if self._thread is None:
            return
        self.state = (
            EngineState.STOPPING
        )  # refuse new requests; those queued before _Stop still get an answer
        self._submit(_Stop())
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.error(
                "engine thread still busy after %.0f s; leaving it to exit with the process", timeout
            )

    async def add(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> RequestGroup:
        """Queue one engine request per (prompt, params); ValueError (none queued) when one can never run."""
        self._check_ready()
        group = RequestGroup(self, len(prompts))
        admitted = self._loop.create_future()
        self._submit(_Add(group, list(prompts), list(params), admitted))
        try:
            await admitted
        except asyncio.CancelledError:
            group.close()
            raise
        return group

    async def encode(self, prompts: Sequence[list[int]], normalize: bool) -> torch.Tensor:
        """Pooled embeddings `[n, hidden]` of an encoder model, computed between two steps of the batch."""
        self._check_ready()
        done = self._loop.create_future()
        self._submit(_Encode(list(prompts), normalize, done))
        return await done

    def unavailable_reason(self) -> str | None:
        """Why the engine takes no requests now (None when READY)."""
        return {
            EngineState.READY: None,
            EngineState.LOADING: "the model is still loading; retry shortly",
            EngineState.FAILED: f"the model failed to load: {self.load_error}",
            EngineState.STOPPING: "the server is shutting down",
        }[self.state]

    def _check_ready(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise EngineUnavailable(reason)

    def _submit(self, command) -> None:
        self._commands.put(command)

    def _run(self) -> None:
        """The engine thread: build and warm up the LLM, then apply commands and step while requests run."""
        try:
            llm = self._make_llm()
            _warm_up(llm)
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            self.state = EngineState.FAILED
            logger.exception("could not load the model")
            if self._on_load_failure is not None:
                self._loop.call_soon_threadsafe(self._on_load_failure, self.load_error)
            return
        self.llm = llm
        if self.state is EngineState.LOADING:  # not already shutting down
            self.state = EngineState.READY
        logger.info("engine ready")
        live: dict[int, tuple[RequestGroup, int]] = {}  # engine request id -> (group, choice)
        while True:
            commands = [] if llm.has_unfinished else [self._commands.get()]  # idle: sleep until work comes
            while not self._commands.empty():
                commands.append(self._commands.get_nowait())
            if any(isinstance(command, _Stop) for command in commands):
                for command in commands:  # requests queued before the stop get their answer too
                    if not isinstance(command, _Stop):
                        self._apply(llm, live, command)
                self._fail_all(llm, live, SHUTDOWN_ERROR)
                return
            try:
                for command in commands:
                    self._apply(llm, live, command)
                if llm.has_unfinished:
                    self._step(llm, live)
            except Exception as err:  # a bug here must not leave every waiting client hanging
                logger.exception("engine loop failed")
                self._fail_all(llm, live, f"engine error: {type(err).__name__}: {err}")

    def _apply(self, llm: LLM, live: dict[int, tuple[RequestGroup, int]], command) -> None:
        if isinstance(command, _Add):
            group = command.group
            try:
                for prompt, params in zip(command.prompts, command.params, strict=True):
                    group.request_ids.append(llm.add_request(prompt, params))
            except Exception as err:
                for request_id in group.request_ids:
                    llm.abort(request_id)
                self._loop.call_soon_threadsafe(_settle, command.admitted, None, err)
                return
            for choice, request_id in enumerate(group.request_ids):
                live[request_id] = (group, choice)
            self.stats.requests_added += len(group.request_ids)
            self.stats.running_requests = len(live)
            self._loop.call_soon_threadsafe(_settle, command.admitted, None, None)
        elif isinstance(command, _Abort):
            for choice in command.choices:
                if choice < len(command.group.request_ids):
                    request_id = command.group.request_ids[choice]
                    if live.pop(request_id, None) is not None and llm.abort(request_id):
                        self.stats.requests_aborted += 1
            self.stats.running_requests = len(live)
        elif isinstance(command, _Encode):
            try:
                result, error = llm.encode(command.prompts, normalize=command.normalize), None
            except Exception as err:
                result, error = None, err
            self._loop.call_soon_threadsafe(_settle, command.done, result, error)
        else:
            raise TypeError(f"AsyncEngine: unknown command {command!r}")

    def _step(self, llm: LLM, live: dict[int, tuple[RequestGroup, int]]) -> None:
        updates = llm.step()
        deliveries = []
        for update in updates:
            group, choice = live.pop(update.request_id) if update.finished else live[update.request_id]
            deliveries.append((group, choice, update))
        stats = self.stats
        stats.steps += 1
        new_tokens = sum(len(u.token_ids) for u in updates)
        stats.generated_tokens += new_tokens
        stats.max_tokens_in_step = max(stats.max_tokens_in_step, new_tokens)
        stats.running_requests = len(live)
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail_all(self, llm: LLM, live: dict[int, tuple[RequestGroup, int]], error: str) -> None:
        deliveries = []
        for request_id, (group, choice) in live.items():
            llm.abort(request_id)
            deliveries.append((group, choice, TokenUpdate(request_id, [], error=error)))
        if live:
            logger.warning("%s: failing %d unfinished request(s)", error, len(live))
        live.clear()
        self.stats.running_requests = 0
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)


def _warm_up(llm: LLM) -> None:
    """Run one tiny request so the first compiles (extend and decode) happen before the server says ready."""
    if llm.is_encoder:
        llm.encode([[0]])
    else:
        llm.generate([[0]], SamplingParams(max_new_tokens=2, ignore_eos=True))


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # its awaiting handler was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(deliveries: list[tuple[RequestGroup, int, TokenUpdate]]) -> None:
    for group, choice, update in deliveries:
        group._put(choice, update)
