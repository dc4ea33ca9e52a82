"""SamplingParams (what a user asks for), Request (one generation's state in the engine), RequestOutput (result)."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixc.engine.batch_builder import RequestMemory
    from radixc.engine.gdn_checkpoints import CheckpointPlan
    from radixc.engine.prefix_cache import CacheNode


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop; checked on construction.

    temperature 0 is greedy; top_k -1 and top_p 1.0 disable those filters; a seed makes the request's samples
    reproducible whatever else shares its batches. EOS ids come from the model unless ignore_eos.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            problems.append(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        elif self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            problems.append(f"temperature must be a finite number, got {self.temperature!r}")
        elif self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not (self.top_k == -1 or self.top_k >= 1)
        ):
            problems.append(f"top_k must be -1 (off) or a positive int, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed must be None or an int, got {self.seed!r}")
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop
        ):
            problems.append(f"stop_token_ids must be non-negative ints, got {stop!r}")
        if not isinstance(self.ignore_eos, bool):
            problems.append(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))
        object.__setattr__(self, "stop_token_ids", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class FinishReason(str, enum.Enum):
    """Why a request ended: its token limit (max_new_tokens or the context) or a stop / EOS token."""

    LENGTH = "length"
    STOP = "stop"


@dataclasses.dataclass
class RequestOutput:
    """One prompt's result: generated token ids (a stop or EOS token included), text when a tokenizer exists,
    finish_reason "length" | "stop", or error (a message) when the request failed."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class TokenUpdate:
    """What one `LLM.step()` did to one added request: its new token ids, and once it ended, why
    (finish_reason "length" | "stop") or its error."""

    request_id: int
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclasses.dataclass(eq=False)
class Request:
    """A generation in flight. Its tokens are prompt + output; the KV cache holds the first `num_cached`.

    A request is waiting while it holds no memory (new, or preempted: its output is kept and recomputed),
    prefilling while more than one of its tokens is uncomputed, decoding when exactly one (the last) is.
    """

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    output_ids: list[int] = dataclasses.field(default_factory=list)
    memory: RequestMemory | None = None
    # prefix-cache nodes of this request's first len(cache_nodes) pages, one reference held on each
    cache_nodes: list[CacheNode] = dataclasses.field(default_factory=list)
    # hybrid models with the prefix cache: where this admission takes GDN state checkpoints
    checkpoint_plan: CheckpointPlan | None = None
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_cached(self) -> int:
        return 0 if self.memory is None else self.memory.num_cached

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def decoding(self) -> bool:
        # read for every running request at every step: spelled out, no nested properties
        memory = self.memory
        return memory is not None and len(self.prompt_ids) + len(self.output_ids) - memory.num_cached == 1

    def to_output(self, text: str | None = None) -> RequestOutput:
        return RequestOutput(
            index=self.index,
            prompt_token_ids=list(self.prompt_ids),
            token_ids=list(self.output_ids),
            text=text,
            finish_reason=None if self.finish_reason is None else self.finish_reason.value,
            error=self.error,
        )
