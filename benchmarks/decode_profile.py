"""Where a decode step's time goes: the compiled model's decode steps, replayed from CUDA graphs (or launched
uncaptured with --no-graphs), under torch.profiler; prints, per batch size, the step's wall time, the host part,
the summed kernel time, the memory floor, and the kernels that take the most time per step.

    python3 benchmarks/decode_profile.py --model llama-1b --batch-sizes 1,32 --context 1024
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from radixc.passes import set_switches
from radixc.tools.bench_floor import copy_bandwidth, state_bytes, weight_bytes
from radixc.tools.bench_steps import StepBench, compile_forward
from radixc.tools.bench_timing import device_name, median
from radixc.tools.inspect import load


def kernel_times(prof: profile, steps: int) -> list[tuple[str, int, float]]:
    """[(kernel name, launches per step, µs per step)], most time first, from the profiler's device events."""
    launches: collections.Counter[str] = collections.Counter()
    micros: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            launches[event.name] += 1
            micros[event.name] += event.device_time_total
    return sorted(
        ((name, launches[name] // steps, micros[name] / steps) for name in micros),
        key=lambda row: -row[2],
    )


def profile_batch(
    bench: StepBench, model: torch.nn.Module, forward, graphs, batch_size: int, args: argparse.Namespace
) -> dict:
    """One batch size: timed steps, then profiled steps, of decode after a prefill of args.context tokens."""
    requests, _ = bench.prefill(forward, batch_size, args.context)
    try:
        for _ in range(args.warmup):
            bench.decode(forward, requests, graphs)
        timed = [bench.decode(forward, requests, graphs) for _ in range(args.steps)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                bench.decode(forward, requests, graphs)
        contexts = [args.context + args.warmup + args.steps + 1] * batch_size
    finally:
        bench.release(requests)
    if args.trace:
        prof.export_chrome_trace(str(args.trace.with_name(f"{args.trace.stem}_b{batch_size}.json")))
    kernels = kernel_times(prof, args.steps)
    floor_bytes = weight_bytes(model, batch_size) + state_bytes(bench.spec, bench.dtype, contexts)
    return {
        "batch_size": batch_size,
        "step_ms": median([s.seconds for s in timed]) * 1e3,
        "host_ms": median([s.host_seconds for s in timed]) * 1e3,
        "kernel_ms": sum(us for _, _, us in kernels) / 1e3,
        "kernels_per_step": sum(n for _, n, _ in kernels),
        "floor_ms": floor_bytes / args.bandwidth * 1e3,
        "top": [{"kernel": name, "per_step": n, "us": round(us, 2)} for name, n, us in kernels[: args.top]],
    }


def render(result: dict) -> str:
    lines = [
        f"batch {result['batch_size']}: step {result['step_ms']:.3f} ms (host {result['host_ms']:.3f}), "
        f"kernels {result['kernel_ms']:.3f} ms in {result['kernels_per_step']} launches, "
        f"floor {result['floor_ms']:.3f} ms (step/floor {result['step_ms'] / result['floor_ms']:.2f}x, "
        f"kernels/floor {result['kernel_ms'] / result['floor_ms']:.2f}x)",
        f"  {'us/step':>9} {'n':>4} {'share':>6}  kernel",
    ]
    for row in result["top"]:
        share = row["us"] / 1e3 / result["kernel_ms"]
        lines.append(f"  {row['us']:9.1f} {row['per_step']:4d} {share:6.1%}  {row['kernel'][:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--batch-sizes", default="1,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-graphs", action="store_true", help="launch the compiled steps uncaptured")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace per batch size (name_bN.json)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--passes", default="", help="pass switches to set first, e.g. fuse_rms_norm_linear=0"
    )
    args = parser.parse_args(argv)
    set_switches(args.passes)
    if not torch.cuda.is_available():
        print(
            "decode_profile.py needs a CUDA device: it profiles decode steps replayed from CUDA graphs",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    model = load(args.model, args.dtype, device)
    max_context = args.context + args.warmup + 2 * args.steps + 2
    bench = StepBench(model, args.backend, max(args.batch_sizes), max_context, device)
    forward = compile_forward(model)
    args.bandwidth = copy_bandwidth(device)
    # the compile happens in the first prefill and the first uncaptured decode, before any capture
    warm, _ = bench.prefill(forward, 1, 16)
    bench.decode(forward, warm)
    bench.release(warm)
    graphs = None if args.no_graphs else bench.capture(forward)
    print(
        f"{args.model} {args.dtype} {args.backend} on {device_name(device)}, context {args.context}, "
        f"copy bandwidth {args.bandwidth / 1e12:.2f} TB/s, {'uncaptured' if graphs is None else 'CUDA graphs'}"
    )
    results = []
    for batch_size in args.batch_sizes:
        results.append(profile_batch(bench, model, forward, graphs, batch_size, args))
        print(render(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
