"""StepStats: how many model steps an LLM ran, per mode, and the wall time they took."""

from __future__ import annotations

import dataclasses

from radixc.forward_batch import ForwardMode


@dataclasses.dataclass
class StepStats:
    """Counters of an LLM's model steps: each step's time runs from its launch, or from the end of the step
    before when that is later (overlapped steps), to its sampled tokens on the host, so on a GPU it includes the
    wait for the kernels and the times add up to the engine's busy time. Compared between offline generation and
    a server, they tell slower steps apart from time spent between steps. `overlapped_steps` counts the decode
    steps launched before the step they follow had finished (overlapped scheduling)."""

    extend_steps: int = 0
    extend_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    overlapped_steps: int = 0

    def record(self, mode: ForwardMode, seconds: float, overlapped: bool = False) -> None:
        self.overlapped_steps += overlapped
        if mode.is_extend():
            self.extend_steps += 1
            self.extend_seconds += seconds
        else:
            self.decode_steps += 1
            self.decode_seconds += seconds

    def since(self, earlier: StepStats) -> StepStats:
        """What was counted after the snapshot `earlier` (a `copy()` of these counters)."""
        return StepStats(
            *(getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(self))
        )

    def copy(self) -> StepStats:
        return dataclasses.replace(self)
