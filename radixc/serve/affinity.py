"""CPU affinity for serving: the engine process on CPUs of its own, the HTTP process on the others.

On a CPU-served model the engine's step is the critical path; when the HTTP process (and anything else) shares
its cores, the scheduler preempts the step for them. `--engine-cpus 0-3` keeps the engine on CPUs 0-3 and the
server process off them, as CPU inference servers reserve cores for the model and leave the rest to the
frontend. Linux only (`os.sched_setaffinity`).
"""

from __future__ import annotations

import os
from collections.abc import Collection


def available_cpus() -> set[int]:
    """The CPUs this process may run on."""
    if not hasattr(os, "sched_getaffinity"):
        raise ValueError("CPU affinity needs Linux (os.sched_setaffinity)")
    return os.sched_getaffinity(0)


def parse_cpu_list(text: str) -> list[int]:
    """CPU ids from a list such as "0-3,6" (taskset's syntax); each must be one this process may run on."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last if dash else first) + 1))
    except ValueError:
        raise ValueError(f"not a CPU list: {text!r} (expected e.g. 0-3,6)") from None
    if not cpus:
        raise ValueError(f"not a CPU list: {text!r} (expected e.g. 0-3,6)")
    missing = cpus - available_cpus()
    if missing:
        raise ValueError(
            f"CPU(s) {sorted(missing)} are not available here (available: {sorted(available_cpus())})"
        )
    return sorted(cpus)


def pin_engine(cpus: Collection[int]) -> None:
    """Keep this (the engine) process on `cpus`."""
    os.sched_setaffinity(0, cpus)


def pin_server_beside(engine_cpus: Collection[int]) -> list[int]:
    """Keep this (the server) process off the engine's CPUs; returns the CPUs it keeps (all of them, unchanged,
    when the engine was given every CPU)."""
    others = sorted(available_cpus() - set(engine_cpus))
    if others:
        os.sched_setaffinity(0, others)
        return others
    return sorted(available_cpus())
