"""What the server process and the engine process say to each other over their Channel.

Server -> engine: commands (add requests, abort them, encode prompts, query stats, shut down). Engine -> server:
`Ready` or `LoadFailed` once, then per step one `StepUpdates` carrying every request's new tokens, and a `Reply`
to each command that asked for one. Request ids are the server's: it can abort a request the engine has not
admitted yet, and the engine maps them to its LLM's own.
"""

from __future__ import annotations

import dataclasses

from tokenizers import Tokenizer

from radixc.engine.request import SamplingParams
from radixc.engine.step_stats import StepStats


@dataclasses.dataclass
class AddRequests:
    """One engine request per (request id, prompt, params), all admitted or none (`Reply.error` says why)."""

    reply_to: int
    request_ids: list[int]
    prompts: list[list[int]]
    params: list[SamplingParams]


@dataclasses.dataclass
class AbortRequests:
    """End these requests now, freeing their pages; ids already ended (or never admitted) are ignored."""

    request_ids: list[int]


@dataclasses.dataclass
class Encode:
    """Pooled embeddings of an encoder model; the reply is a float32 numpy array `[len(prompts), hidden]`."""

    reply_to: int
    prompts: list[list[int]]
    normalize: bool


@dataclasses.dataclass
class QueryStats:
    """The reply is the engine's EngineStats, pools included."""

    reply_to: int


@dataclasses.dataclass
class Shutdown:
    """Apply what came before, fail every unfinished request with SHUTDOWN_ERROR, then exit."""


SHUTDOWN_ERROR = "server shutting down"  # the error of requests still running when the engine stops


@dataclasses.dataclass
class ModelInfo:
    """What the server process needs of the model: sent once, when the engine is ready."""

    is_encoder: bool
    max_context_len: int
    tokenizer: Tokenizer | None  # pickles as its JSON


@dataclasses.dataclass
class Ready:
    model: ModelInfo


@dataclasses.dataclass
class LoadFailed:
    error: str  # "ExceptionType: message"


@dataclasses.dataclass
class Reply:
    """The answer to the command numbered `reply_to`: a result, or an error (invalid: the input can never
    run, a 400; otherwise the engine failed)."""

    reply_to: int
    result: object = None
    error: str | None = None
    invalid: bool = False


# one step's (request id, new token ids, finish reason, error) of every request that got a token or ended
Update = tuple[int, list[int], str | None, str | None]


@dataclasses.dataclass
class StepUpdates:
    updates: list[Update]


@dataclasses.dataclass
class EngineStats(StepStats):
    """The engine's counters and pools, for /metrics: steps shared by many requests show batching at work, and
    free pages that return to capacity show aborted requests gave theirs back. The model steps per mode and their
    time come from the LLM's StepStats; the rest of step_seconds is scheduling."""

    steps: int = 0
    # wall time inside the LLM's steps; the engine's other time went to commands, sending updates, or idling
    step_seconds: float = 0.0
    generated_tokens: int = 0
    max_tokens_in_step: int = 0  # the most requests that got a token in one step
    requests_added: int = 0
    requests_aborted: int = 0
    running_requests: int = 0
    kv_pages: int = 0  # usable pages of the KV pool (one more is reserved for padding)
    free_kv_pages: int = 0
    cached_kv_pages: int = 0  # held by the prefix cache for reuse, no request's
    request_rows: int = 0  # usable rows of the request -> token table
    free_request_rows: int = 0


# the rest are gauges
STATS_COUNTERS = (
    *(field.name for field in dataclasses.fields(StepStats)),
    "steps",
    "step_seconds",
    "generated_tokens",
    "requests_added",
    "requests_aborted",
)
