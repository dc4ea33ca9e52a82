"""radixc-bench: how fast a model compiles, prefills and decodes in radixc, eager and compiled, next to the
same shape in Hugging Face transformers and to the memory floor of a decode step.

    radixc-bench --model tiny-llama --batch-sizes 1,8 --context 128 [--json out.json] [--plot out.png]

Cold and warm compile times come from fresh processes (see bench_compile); step times from the engine's pools
and BatchBuilder driving single steps (see bench_steps). Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters
from tqdm.auto import tqdm

from radixc.engine.backends import BACKENDS
from radixc.engine.cuda_graphs import DecodeGraphs
from radixc.models import CheckpointError, list_presets
from radixc.models.config import DTYPE_NAMES
from radixc.tools.bench_compile import CompileTimes, ProbeSettings, measure_compile
from radixc.tools.bench_floor import DecodeFloor, copy_bandwidth, state_bytes, weight_bytes
from radixc.tools.bench_peer import build_peer, peer_decode_ms, peer_version
from radixc.tools.bench_steps import BenchError, Forward, StepBench, compile_forward
from radixc.tools.bench_timing import device_name, median
from radixc.tools.inspect import InspectError, load
from radixc.tools.text_report import format_table

logger = logging.getLogger("radixc.tools")

NO_PEER = "n/a (transformers not installed)"
PEER_OFF = "n/a (--no-peer)"
MODES = ("eager", "compiled")


@dataclasses.dataclass(frozen=True)
class ModeResult:
    """One forward (eager or compiled) at one batch size: prefill speed and decode step times."""

    prefill_tokens_per_s: float
    decode_ms: float
    decode_host_ms: float


def measure_mode(
    bench: StepBench,
    forward: Forward,
    batch_size: int,
    args: argparse.Namespace,
    graphs: DecodeGraphs | None = None,
) -> ModeResult:
    """Prefill batch_size fresh requests of args.context tokens (median of args.repeats after one warm-up,
    which compiles in compiled mode), then time args.steps decode steps on the last ones after args.warmup
    (replayed from `graphs` when given)."""
    requests, prefill = [], []
    try:
        for _ in range(1 + args.repeats):
            bench.release(requests)
            requests = []  # released: a failing prefill must not release them again
            requests, step = bench.prefill(forward, batch_size, args.context)
            prefill.append(step.seconds)
        decode = [bench.decode(forward, requests, graphs) for _ in range(args.warmup + args.steps)][
            args.warmup :
        ]
    finally:
        bench.release(requests)
    return ModeResult(
        prefill_tokens_per_s=batch_size * args.context / median(prefill[1:]),
        decode_ms=median([s.seconds for s in decode]) * 1e3,
        decode_host_ms=median([s.host_seconds for s in decode]) * 1e3,
    )


def decode_floor(
    model: torch.nn.Module, bench: StepBench, batch_size: int, args: argparse.Namespace, bandwidth: float
) -> DecodeFloor:
    """The floor of the timed decode steps, contexts from context + warmup + 1, state bytes averaged."""
    first = args.context + args.warmup + 1
    contexts = range(first, first + args.steps)
    per_step = [state_bytes(bench.spec, bench.dtype, [n] * batch_size) for n in contexts]
    return DecodeFloor(weight_bytes(model, batch_size), round(statistics.mean(per_step)), bandwidth)


def measure_radixc(
    model: torch.nn.Module, bench: StepBench, args: argparse.Namespace, bar: tqdm
) -> tuple[dict[tuple[str, int], ModeResult], int]:
    """({(mode, batch size): result} for the eager model, its compiled twin and, where the device and backend allow,
    the compiled twin replayed from CUDA graphs; the number of graphs the compile made)."""
    compiled = compile_forward(model)
    graphs_before = counters["stats"]["unique_graphs"]
    results = {}
    for mode, forward in (("eager", model), ("compiled", compiled), ("compiled_cuda_graphs", compiled)):
        graphs = None
        if mode == "compiled_cuda_graphs":
            if bench.cuda_graphs_problem:
                continue
            bar.set_description("radixc: capturing CUDA graphs")
            graphs = bench.capture(compiled)
        for batch_size in args.batch_sizes:
            bar.set_description(f"radixc {mode}, batch {batch_size}")
            results[mode, batch_size] = measure_mode(bench, forward, batch_size, args, graphs)
            bar.update()
    return results, counters["stats"]["unique_graphs"] - graphs_before


def measure_peer(
    raw_config: dict[str, Any], dtype: torch.dtype, device: torch.device, args: argparse.Namespace, bar: tqdm
) -> tuple[dict[int, float | str], str | None]:
    """({batch size: transformers decode ms/step or its error text}, its attention implementation)."""
    bar.set_description("transformers: build")
    peer = build_peer(raw_config, dtype, device)
    generator = torch.Generator().manual_seed(args.seed)
    results = {}
    for batch_size in args.batch_sizes:
        bar.set_description(f"transformers, batch {batch_size}")
        results[batch_size] = peer_decode_ms(
            peer, batch_size, args.context, args.warmup, args.steps, generator
        )
        bar.update()
    return results, None if isinstance(peer, str) else peer.attn_implementation


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of a run, as the JSON report."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    model = load(args.model, args.dtype, device)
    bench = StepBench(model, args.backend, max(args.batch_sizes), _max_context(args), device, args.seed)
    transformers_version = peer_version()
    run_peer = transformers_version is not None and not args.no_peer
    graphs_problem = bench.cuda_graphs_problem
    tasks = (
        (not args.skip_compile_probe) + 1 + len(args.batch_sizes) * (2 + (graphs_problem is None) + run_peer)
    )
    with tqdm(total=tasks, unit="task", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        compile_times = None
        if not args.skip_compile_probe:
            bar.set_description("compile probes (cold, warm)")
            settings = ProbeSettings(
                model=args.model,
                dtype=args.dtype,
                device=str(device),
                backend=args.backend,
                batch_size=args.batch_sizes[0],
                context=args.context,
                threads=args.threads,
            )
            compile_times = measure_compile(settings)
            bar.update()
        bar.set_description("copy bandwidth")
        bandwidth = copy_bandwidth(device)
        bar.update()
        results, compiled_graphs = measure_radixc(model, bench, args, bar)
        floors = {b: decode_floor(model, bench, b, args, bandwidth) for b in args.batch_sizes}
        dtype, config = next(model.parameters()).dtype, model.config
        num_params, backend = sum(p.numel() for p in model.parameters()), bench.backend_name
        # free the model and its compiled graphs (Dynamo's caches hold it) before the peer builds its own
        del model, bench
        torch._dynamo.reset()
        gc.collect()
        peer_results, attn_implementation = {}, None
        if run_peer:
            peer_results, attn_implementation = measure_peer(dict(config.raw), dtype, device, args, bar)
    missing_peer = NO_PEER if transformers_version is None else PEER_OFF
    rows = [
        _row(
            b,
            args.context,
            results["eager", b],
            results["compiled", b],
            results.get(("compiled_cuda_graphs", b), graphs_problem),
            peer_results.get(b, missing_peer),
            floors[b],
        )
        for b in args.batch_sizes
    ]
    return {
        "model": args.model,
        "architecture": config.architecture,
        "num_params": num_params,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "backend": backend,
        "torch": torch.__version__,
        "transformers": transformers_version,
        "settings": {
            "batch_sizes": args.batch_sizes,
            "context": args.context,
            "steps": args.steps,
            "warmup": args.warmup,
            "prefill_repeats": args.repeats,
            "seed": args.seed,
        },
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "compile": None if compile_times is None else _compile_json(compile_times),
        "compiled_graphs": compiled_graphs,
        "peer": {
            "library": "transformers",
            "cache": "static",
            "compile": "torch.compile(model.forward)",
            "attn_implementation": attn_implementation,
        },
        "rows": rows,
    }


def _row(
    batch_size: int,
    context: int,
    eager: ModeResult,
    compiled: ModeResult,
    graphs: ModeResult | str,
    peer: float | str,
    floor: DecodeFloor,
) -> dict[str, Any]:
    """One batch size's entry of the report (`graphs`: the CUDA-graph result, or why there is none)."""
    decode_ms = {
        "eager": eager.decode_ms,
        "compiled": compiled.decode_ms,
        "compiled_cuda_graphs": graphs if isinstance(graphs, str) else graphs.decode_ms,
        "transformers": peer,
    }
    floor_ms = floor.seconds * 1e3
    return {
        "batch_size": batch_size,
        "context": context,
        "prefill_tokens_per_s": {
            "eager": eager.prefill_tokens_per_s,
            "compiled": compiled.prefill_tokens_per_s,
        },
        "decode_ms_per_step": decode_ms,
        "decode_host_ms_per_step": {
            "eager": eager.decode_host_ms,
            "compiled": compiled.decode_host_ms,
            **({} if isinstance(graphs, str) else {"compiled_cuda_graphs": graphs.decode_host_ms}),
        },
        "floor": {
            "weight_bytes": floor.weight_bytes,
            "state_bytes": floor.state_bytes,
            "ms_per_step": floor_ms,
        },
        "ratio_to_floor": {k: v / floor_ms for k, v in decode_ms.items() if _is_number(v)},
    }


def _max_context(args: argparse.Namespace) -> int:
    return args.context + args.warmup + args.steps


def _compile_json(times: CompileTimes) -> dict[str, dict[str, float]]:
    return {"cold": dataclasses.asdict(times.cold), "warm": dataclasses.asdict(times.warm)}


def _optional_num(seconds: float | None) -> str:
    """A timing, or "-" where there is none."""
    return "-" if seconds is None else _num(seconds)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: float) -> str:
    """A timing with about three significant digits, never in exponent form."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _cell(value: float | str, width: int = 48) -> str:
    if _is_number(value):
        return _num(value)
    return value if len(value) <= width else value[: width - 3] + "..."


def render_table(report: dict[str, Any]) -> str:
    """The report as text: a header, compile times, a prefill table and a decode table."""
    settings, load = report["settings"], report["load_average"]
    lines = [
        f"radixc-bench: {report['model']} ({report['architecture']}, "
        f"{report['num_params'] / 1e6:.2f} M params, {report['dtype']}), backend {report['backend']}",
        f"device {report['device']} ({report['device_name']}), torch threads {report['threads']} of "
        f"{report['cpu_count']} CPUs, torch {report['torch']}, "
        f"transformers {report['transformers'] or 'absent'}",
        f"copy bandwidth {report['copy_bandwidth_gb_per_s']:.1f} GB/s; "
        f"load average {load['start']:.2f} at start, {load['end']:.2f} at end",
        f"context {settings['context']} tokens; prefill: median of {settings['prefill_repeats']} after 1 "
        f"warm-up; decode: median of {settings['steps']} steps after {settings['warmup']} warm-up; radixc "
        f"compiled {report['compiled_graphs']} graph(s)",
        "",
    ]
    compile_times = report["compile"]
    if compile_times is None:
        lines += ["compile: skipped (--skip-compile-probe)", ""]
    else:
        lines.append(
            "compile, seconds of the first call in a fresh process (cold: empty cache dir, warm: reused):"
        )
        rows = [
            [
                cache,
                _optional_num(t.get("imports_s")),
                _optional_num(t.get("load_s")),
                _num(t["extend_s"]),
                _num(t["decode_s"]),
                _optional_num(t.get("capture_s")),
                _num(t["process_s"]),
            ]
            for cache, t in compile_times.items()
        ]
        header = [
            "cache",
            "start + imports",
            "model load",
            "extend",
            "decode",
            "CUDA-graph capture",
            "whole process",
        ]
        lines += format_table(header, rows) + [""]
    lines.append("prefill, tokens/s (one extend step of batch x context tokens):")
    rows = []
    for row in report["rows"]:
        prefill = row["prefill_tokens_per_s"]
        speedup = prefill["compiled"] / prefill["eager"]
        rows.append(
            [
                row["batch_size"],
                row["context"],
                _num(prefill["eager"]),
                _num(prefill["compiled"]),
                f"{speedup:.2f}x",
            ]
        )
    lines += format_table(["batch", "context", "eager", "compiled", "compiled/eager"], rows) + [""]
    lines.append(
        "decode, ms/step (compiled host: building its batch; "
        "floor: (weights + KV/state bytes) / copy bandwidth):"
    )
    rows = []
    for row in report["rows"]:
        ms, ratio, host = row["decode_ms_per_step"], row["ratio_to_floor"], row["decode_host_ms_per_step"]
        rows.append(
            [
                row["batch_size"],
                row["context"],
                _num(ms["eager"]),
                _num(ms["compiled"]),
                _num(host["compiled"]),
                _cell(ms["compiled_cuda_graphs"]),
                _cell(ms["transformers"]),
                _num(row["floor"]["ms_per_step"]),
                *(
                    f"{ratio[k]:.1f}x" if k in ratio else "-"
                    for k in ("eager", "compiled", "compiled_cuda_graphs", "transformers")
                ),
            ]
        )
    headers = [
        "batch",
        "context",
        "eager",
        "compiled",
        "compiled host",
        "compiled+CUDA graphs",
        "transformers static",
        "floor",
        "eager/floor",
        "compiled/floor",
        "graphs/floor",
        "transformers/floor",
    ]
    lines += format_table(headers, rows)
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Decode ms/step and prefill tokens/s against batch size, one line per engine, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    batch_sizes = [row["batch_size"] for row in report["rows"]]
    fig, (decode_ax, prefill_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("eager", "radixc eager"),
        ("compiled", "radixc compiled"),
        ("compiled_cuda_graphs", "radixc compiled + CUDA graphs"),
        ("transformers", "transformers static + compile"),
    ):
        values = [row["decode_ms_per_step"][key] for row in report["rows"]]
        if all(_is_number(v) for v in values):
            decode_ax.plot(batch_sizes, values, marker="o", label=label)
    decode_ax.plot(
        batch_sizes, [row["floor"]["ms_per_step"] for row in report["rows"]], "k--", label="memory floor"
    )
    decode_ax.set(xlabel="batch size", ylabel="ms / decode step", yscale="log", title="decode")
    for key in MODES:
        values = [row["prefill_tokens_per_s"][key] for row in report["rows"]]
        prefill_ax.plot(batch_sizes, values, marker="o", label=f"radixc {key}")
    prefill_ax.set(
        xlabel="batch size",
        ylabel="tokens / s",
        yscale="log",
        title=f"prefill, context {report['settings']['context']}",
    )
    for ax in (decode_ax, prefill_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.legend()
    fig.suptitle(f"{report['model']} {report['dtype']} on {report['device_name']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return list(dict.fromkeys(sizes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radixc-bench",
        description="Compile time, prefill tokens/s and decode ms/step of a model in radixc (eager and "
        "compiled), next to Hugging Face transformers with a static cache and to the memory floor.",
    )
    parser.add_argument(
        "--model", required=True, help=f"a preset ({', '.join(list_presets())}) or a checkpoint dir"
    )
    parser.add_argument(
        "--batch-sizes", type=_batch_sizes, default=[1, 8], help="comma-separated (default 1,8)"
    )
    parser.add_argument("--context", type=int, default=128, help="tokens each request holds before decoding")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps (default 16)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill steps (default 3)")
    parser.add_argument("--device", help="device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default: the model's own)")
    parser.add_argument(
        "--backend",
        choices=["auto", *BACKENDS],
        default="auto",
        help="attention backend (default auto)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument(
        "--skip-compile-probe",
        action="store_true",
        help="do not measure cold and warm compile times in fresh processes (they take the longest)",
    )
    parser.add_argument("--no-peer", action="store_true", help="do not run the transformers comparison")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument(
        "--plot", type=Path, help="also plot decode and prefill speed to this PNG (matplotlib)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (radixc.tools at INFO)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject what would fail only after minutes of measuring."""
    for name, least in (("context", 1), ("steps", 1), ("warmup", 0), ("repeats", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise BenchError(f"--{name} must be at least {least}, got {value}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed (pip install matplotlib)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("radixc").setLevel(logging.INFO)
    try:
        check_args(args)
        report = run_benchmark(args)
    except (BenchError, InspectError, CheckpointError) as err:
        print(f"radixc-bench: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(render_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON report: {args.json}")
    if args.plot is not None:
        write_plot(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
