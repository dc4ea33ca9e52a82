"""Start-up of `LLM(model)` in fresh processes: cold (an empty Inductor cache), then warm (the cache the cold run
filled), each split into `import torch`, `import radixc`, `LLM(...)` (load, compile, capture) and the first
generate, timed from the process's first line; the process's whole wall (interpreter start to exit) and its FX
graph cache hits and misses (a warm run should only hit) beside. A second table says where the compile time
went (`parts`, overlapping: the graphs' warm-up runs hold Dynamo, Inductor and the tuner): Dynamo's frame
compiles in all, of them the backend's (AOTAutograd and Inductor, FX graph cache loads included), the
small-batch linear tuner's candidate compiles (mostly in the background) and of them the seconds the start-up
waited for, its timings, and the CUDA graphs' warm-up runs and captures; then, per kernel, the Triton compiles
of radixc's kernels in the process (how many, and their seconds summed over the threads that ran them).

Python's bytecode cache is part of a warm start: where PYTHONDONTWRITEBYTECODE is set and the sources have no
`__pycache__` (as on the GPU machine), every process compiles the ~2,300 modules torch, Dynamo and Inductor
import from source, ~4 s of a warm start there. `--bytecode-cache DIR` runs the processes with that variable
unset and PYTHONPYCACHEPREFIX=DIR, as an ordinary install (bytecode beside the sources) would be;
`--prime-bytecode` first compiles torch's, triton's and radixc's modules into DIR (`compileall`, as `pip install`
does), so that the cold run's time is the compile of the model, not of Python modules.
Prints a table and writes JSON (--json); never asserts on time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

PHASES = ("import torch", "import radixc", "LLM(...)", "first generate")
PARTS = (
    "Dynamo",
    "of it backend",
    "tuner compiles",
    "of them waited",
    "tuner timing",
    "graph warm-up",
    "graph capture",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="a preset name or a checkpoint directory")
    parser.add_argument("--dtype")
    parser.add_argument("--device")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--warm-runs", type=int, default=2, help="warm processes after the cold one")
    parser.add_argument("--cache-dir", help="Inductor cache directory (default: a new empty one)")
    parser.add_argument("--bytecode-cache", help="run with Python's bytecode written to and read from here")
    parser.add_argument(
        "--prime-bytecode",
        action="store_true",
        help="compile torch's, triton's and radixc's bytecode into --bytecode-cache before the cold run",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def child(args: argparse.Namespace) -> None:
    """One start-up, timed from here; prints one JSON line of seconds per phase."""
    start = time.perf_counter()
    marks = []
    import torch

    marks.append(time.perf_counter())
    from radixc import LLM, SamplingParams

    marks.append(time.perf_counter())
    triton_compiles = record_triton_compiles()
    llm = LLM(args.model, backend=args.backend, device=args.device, dtype=args.dtype, progress=False)
    marks.append(time.perf_counter())
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=2))
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    marks.append(time.perf_counter())
    phases = dict(zip(PHASES, (b - a for a, b in zip([start, *marks], marks))))
    counters = torch._dynamo.utils.counters["inductor"]
    fx_cache = {"hit": counters["fxgraph_cache_hit"], "miss": counters["fxgraph_cache_miss"]}
    result = {"phases": phases, "parts": compile_parts(llm), "first_tokens": marks[-1] - start}
    print(json.dumps({**result, "fx_graph_cache": fx_cache, "triton_compiles": triton_compiles}))


def record_triton_compiles() -> dict[str, dict[str, float]]:
    """From now on, each Triton compile in this process (not a cache hit) by kernel name: how many, and their
    seconds summed (compiles in threads overlap). radixc's kernels compile here; Inductor's in its worker
    processes (not counted)."""
    import threading

    import triton.knobs

    compiles: dict[str, dict[str, float]] = {}
    lock = threading.Lock()

    def listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
        if cache_hit:
            return
        with lock:
            entry = compiles.setdefault(metadata["name"], {"count": 0, "seconds": 0.0})
            entry["count"] += 1
            entry["seconds"] += times.total / 1e6

    triton.knobs.compilation.listener = listener
    return compiles


def compile_parts(llm) -> dict[str, float]:
    """Seconds of the compile work inside the child's start-up (`PARTS`)."""
    import torch._dynamo.utils

    from radixc.ops.triton.gemv import tuning_stats

    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    dynamo = dict(zip(names, map(float, values)))
    graphs = [g for g in (llm.runner.decode_graphs, llm.runner.extend_graphs) if g is not None]
    seconds = (
        dynamo.get("_compile.compile_inner", 0.0),
        dynamo.get("OutputGraph.call_user_compiler", 0.0),
        tuning_stats.compile_seconds,
        tuning_stats.compile_wait_seconds,
        tuning_stats.timing_seconds,
        sum(g.warmup_seconds for g in graphs),
        sum(g.capture_seconds for g in graphs),
    )
    return dict(zip(PARTS, seconds))


def run_child(args: argparse.Namespace, cache_dir: str) -> dict:
    """A fresh process's phases and first-token time, and its wall from launch to exit."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    if args.bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = args.bytecode_cache
    command = [sys.executable, __file__, "--child", "--model", args.model, "--backend", args.backend]
    for flag, value in (("--dtype", args.dtype), ("--device", args.device)):
        if value:
            command += [flag, value]
    launched = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - launched
    if result.returncode != 0:
        sys.exit(f"the start-up process failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_wall": wall}


def prime_bytecode(cache: str) -> float:
    """Compile the bytecode of the packages a start-up imports into `cache`, as `pip install` leaves it beside
    the sources; returns the seconds it took (not part of any run)."""
    packages = [
        os.path.dirname(importlib.util.find_spec(name).origin) for name in ("torch", "triton", "radixc")
    ]
    env = dict(os.environ, PYTHONPYCACHEPREFIX=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    # compileall exits non-zero for the odd file it cannot compile (torch ships a few); those stay uncompiled
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *packages], env=env, capture_output=True
    )
    return time.perf_counter() - started


def bytecode_note(args: argparse.Namespace) -> str:
    if args.bytecode_cache:
        return f"bytecode cached in {args.bytecode_cache}"
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return "PYTHONDONTWRITEBYTECODE is set: modules without a cached bytecode compile in every process"
    return "Python's default bytecode cache"


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    if args.warm_runs < 1:
        sys.exit("--warm-runs must be at least 1")
    if args.prime_bytecode and not args.bytecode_cache:
        sys.exit("--prime-bytecode needs --bytecode-cache")
    primed = prime_bytecode(args.bytecode_cache) if args.prime_bytecode else None
    with tempfile.TemporaryDirectory(prefix="radixc-startup-") as scratch:
        cache_dir = args.cache_dir or scratch
        runs = [("cold", run_child(args, cache_dir))]
        runs += [(f"warm {i + 1}", run_child(args, cache_dir)) for i in range(args.warm_runs)]
    print(f"{args.model}: start-up in fresh processes, seconds ({bytecode_note(args)})")
    if primed is not None:
        print(f"(bytecode of torch, triton and radixc compiled first, in {primed:.1f} s, outside the runs)")
    header = ["run", *PHASES, "first tokens", "process wall", "FX cache hit/miss"]
    print("  ".join(f"{h:>15}" for h in header))
    for name, run in runs:
        cells = [*(run["phases"][p] for p in PHASES), run["first_tokens"], run["process_wall"]]
        fx_cache = f"{run['fx_graph_cache']['hit']} / {run['fx_graph_cache']['miss']}"
        print(f"{name:>15}  " + "  ".join(f"{c:15.2f}" for c in cells) + f"  {fx_cache:>17}")
    print("compile work inside those, seconds (overlapping: the graphs' warm-up runs hold the others)")
    print("  ".join(f"{h:>15}" for h in ["run", *PARTS]))
    for name, run in runs:
        print(f"{name:>15}  " + "  ".join(f"{run['parts'][p]:15.2f}" for p in PARTS))
    for name, run in runs:
        kernels = sorted(run["triton_compiles"].items(), key=lambda item: -item[1]["seconds"])
        compiled = ", ".join(f"{k} x{v['count']} {v['seconds']:.1f} s" for k, v in kernels) or "none"
        print(f"{name}: radixc's Triton compiles (count, seconds summed over threads): {compiled}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "model": args.model,
                    "bytecode": bytecode_note(args),
                    "primed_seconds": primed,
                    "runs": dict(runs),
                },
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
