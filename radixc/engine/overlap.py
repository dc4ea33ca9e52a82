"""Overlapped scheduling: a step's sampled tokens stay on the device while the engine plans and launches the
step that follows, and come back to the host only then, so the host's work for step N+1 runs while the device
computes step N (on a GPU; on the CPU a forward runs to its end before it returns, and nothing overlaps)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from radixc.engine.scheduler import ScheduledStep


@dataclasses.dataclass
class LaunchedStep:
    """A step queued on the device: its sampled tokens `[rows]` on the device (None when no row samples), when
    it was launched, and `read`, which waits for those tokens and returns them as a host list."""

    step: ScheduledStep
    tokens: torch.Tensor | None
    launched_at: float
    read: Callable[[], list[int]]


class TokenReadback:
    """Copies each launched step's tokens into pinned host memory without waiting for them.

    Two buffers alternate, as at most two steps are in flight (the one being read and the one that follows it),
    and each is read only after its copy's event has completed.
    """

    def __init__(self, max_rows: int, device: torch.device):
        self._buffers, self._events, self._next = [], [], 0
        if device.type == "cuda":
            self._buffers = [torch.empty(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]

    def start(self, tokens: torch.Tensor | None) -> Callable[[], list[int]]:
        """Queue the copy of `tokens` `[rows]` to the host; returns the function that waits for and reads it."""
        if tokens is None:
            return list
        if not self._buffers:
            return tokens.tolist
        index, self._next = self._next, 1 - self._next
        host = self._buffers[index][: tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        event = self._events[index]
        event.record()

        def read() -> list[int]:
            event.synchronize()
            return host.tolist()

        return read
