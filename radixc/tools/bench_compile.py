"""Cold and warm compile time for radixc-bench, each measured in a fresh Python process.

Cold: a process on an empty TORCHINDUCTOR_CACHE_DIR (and TRITON_CACHE_DIR); warm: a second process on the same
directories, so Inductor's FX graph and AOTAutograd caches hit while Dynamo still traces from scratch. Each
process times the first compiled extend step and the first compiled decode step (compile plus one run).

    python -m radixc.tools.bench_compile --model tiny-llama --batch-size 1 --context 128   # one probe: JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from radixc.tools.bench_steps import BenchError, StepBench, compile_forward
from radixc.tools.inspect import load

logger = logging.getLogger("radixc.tools")

PROBE_MODULE = "radixc.tools.bench_compile"


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """What the probe process loads and runs: the benchmark's model, placement and first batch."""

    model: str
    dtype: str | None
    device: str
    backend: str
    batch_size: int
    context: int
    threads: int | None = None

    def argv(self) -> list[str]:
        args = [
            "--model",
            self.model,
            "--device",
            self.device,
            "--backend",
            self.backend,
            "--batch-size",
            str(self.batch_size),
            "--context",
            str(self.context),
        ]
        if self.dtype is not None:
            args += ["--dtype", self.dtype]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        return args


@dataclasses.dataclass(frozen=True)
class FirstCalls:
    """Seconds of a process's first compiled extend and decode calls, of capturing its decode CUDA graphs (None
    where there is no capture: off CUDA or on a backend that cannot be captured), and of the whole process; and
    what came before the first call: starting Python with its imports, and loading the model (CUDA's start
    included)."""

    extend_s: float
    decode_s: float
    process_s: float
    capture_s: float | None = None
    imports_s: float | None = None
    load_s: float | None = None


@dataclasses.dataclass(frozen=True)
class CompileTimes:
    cold: FirstCalls
    warm: FirstCalls


Runner = Callable[..., subprocess.CompletedProcess]


def measure_compile(settings: ProbeSettings, run: Runner = subprocess.run) -> CompileTimes:
    """Run the probe twice in fresh processes sharing a new, empty compile cache directory (removed after)."""
    cache = Path(tempfile.mkdtemp(prefix="radixc-bench-cache-"))
    try:
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
        }
        cold = _probe(settings, env, run, "cold")
        warm = _probe(settings, env, run, "warm")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return CompileTimes(cold, warm)


def _probe(settings: ProbeSettings, env: dict[str, str], run: Runner, label: str) -> FirstCalls:
    command = [sys.executable, "-m", PROBE_MODULE, *settings.argv(), "--spawned-at", repr(time.time())]
    logger.info(
        "%s compile probe: %s (TORCHINDUCTOR_CACHE_DIR=%s)",
        label,
        " ".join(command),
        env["TORCHINDUCTOR_CACHE_DIR"],
    )
    start = time.perf_counter()
    done = run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise BenchError(f"{label} compile probe exited {done.returncode}:\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return FirstCalls(
        result["extend_s"],
        result["decode_s"],
        seconds,
        result.get("capture_s"),
        result.get("imports_s"),
        result.get("load_s"),
    )


def probe(settings: ProbeSettings) -> dict[str, float]:
    """In this process: load the model, then time its first compiled extend and decode steps and, where decode can
    be captured, the capture of its CUDA graphs (batch-size buckets up to the probe's batch)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    start = time.perf_counter()
    model = load(settings.model, settings.dtype, device)
    load_s = time.perf_counter() - start
    bench = StepBench(model, settings.backend, settings.batch_size, settings.context + 1, device)
    forward = compile_forward(model)
    requests, extend = bench.prefill(forward, settings.batch_size, settings.context)
    decode = bench.decode(forward, requests)
    capture_s = None
    if bench.cuda_graphs_problem is None:
        start = time.perf_counter()
        bench.capture(forward)
        capture_s = time.perf_counter() - start
    return {"extend_s": extend.seconds, "decode_s": decode.seconds, "capture_s": capture_s, "load_s": load_s}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROBE_MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype")
    parser.add_argument("--device", required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--spawned-at", type=float, help="time.time() when the parent started this process")
    args = parser.parse_args(argv)
    spawned_at = vars(args).pop("spawned_at")
    imports_s = None if spawned_at is None else time.time() - spawned_at
    settings = ProbeSettings(**vars(args))
    try:
        result = {**probe(settings), "imports_s": imports_s}
    except BenchError as err:
        print(f"{PROBE_MODULE}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
