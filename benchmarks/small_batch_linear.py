"""The decode-time linear layers of a model, cuBLAS against radixc's small-batch Triton kernel.

Every linear shape of the model (and its LM head) at each row count, timed inside a CUDA graph as a decode step
runs them, each call reading a different copy of the weight so that L2 never holds it: cuBLAS, the kernel with
its untuned tiles, and `tuned_linear` (what the compiled decode step runs: the fastest of cuBLAS and the
candidate tiles, timed once per shape); prints µs per call and the weight-read bandwidth. `--sweep` also times a
grid of tile shapes, to choose the candidates (`--split-k 1,2,4` also with K cut into runs; the tuned choice
includes the split-K candidates above one row unless `RADIXC_GEMV_SPLIT_K=0`). `--fusion norm` or `residual` times
each with that fusion folded in, against cuBLAS with the unfused kernels around it (`cublas_linear`).

    python3 benchmarks/small_batch_linear.py --model llama-1b --rows 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from radixc.models.presets import preset_config
from radixc.models.registry import build_model, model_config
from radixc.tools.bench_timing import device_name

L2_FLUSH_BYTES = 256 << 20  # weight copies per shape add up to at least this (H100/H200 L2: 50 MB)
CALLS_PER_GRAPH = 32


def linear_shapes(model_name: str) -> collections.Counter[tuple[int, int]]:
    """(in_features, out_features) of each linear layer and the LM head, with how many a decode step runs."""
    model_cls, config = model_config(preset_config(model_name))
    model = build_model(model_cls, config, torch.bfloat16, "meta")
    shapes = collections.Counter(
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    vocab, hidden = model.lm_head_module.weight.shape
    shapes[(hidden, vocab)] += 1
    return shapes


def time_in_graph(calls: list[Callable[[], object]], repeats: int = 10) -> float:
    """Median µs per call of `calls`, captured back to back in one CUDA graph and replayed."""
    from radixc.ops.triton.gemv import graph_replay_ms

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up (compiles, picks cuBLAS kernels) outside the capture
            call()
    torch.cuda.synchronize()
    return graph_replay_ms(calls, repeats) * 1e3 / len(calls)


def tile_grid(rows: int, in_features: int, splits: list[int]) -> list:
    """Tile shapes to sweep: narrow column blocks for the multiply-reduce path, tl.dot-sized ones from 16 rows;
    each with K cut into each of `splits` runs that are at least a K step long."""
    from radixc.ops.triton.gemv import LinearTiles

    if rows >= 16:
        # K steps past 256 too: a long-K weight (down_proj) on few column blocks needs more bytes in flight
        grid = itertools.product((16, 32, 64), (128, 256, 512, 1024), (4, 8), (3, 4))
    else:
        # K steps past 512 too: the loop's plain loads are not pipelined, so a long-K weight (llama-1b's
        # down_proj, K = 8192) keeps more bytes in flight per program only with longer steps
        grid = itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (2, 4, 8), (2, 4))
    return [
        LinearTiles(*tiles, split)
        for tiles, split in itertools.product(grid, splits)
        if in_features >= split * tiles[1]
    ]


def fusions_for_float(fusions):
    """The same fusions on float32 tensors, for the float32 reference."""
    norm, residual = fusions.norm, fusions.residual
    return dataclasses.replace(
        fusions,
        norm=None if norm is None else norm._replace(weight=norm.weight.float()),
        residual=None if residual is None else residual.float(),
    )


def fusions_for(name: str, rows: int, in_features: int, out_features: int, dtype: torch.dtype):
    """The GEMV fusions `--fusion` names: none, an RMSNorm of x (as before qkv / gate-up / the LM head), or a
    residual added (as after o_proj / down_proj)."""
    from radixc.ops.triton.gemv import Fusions, RMSNormArgs

    if name == "norm":
        return Fusions(
            norm=RMSNormArgs(torch.rand(in_features, device="cuda", dtype=dtype) + 0.5, 1e-6, False)
        )
    if name == "residual":
        return Fusions(residual=torch.randn(rows, out_features, device="cuda", dtype=dtype))
    return Fusions()


def measure(
    shape: tuple[int, int], rows: int, dtype: torch.dtype, sweep: bool, splits: list[int], fusion: str
) -> dict:
    from radixc.ops.triton.gemv import _fastest, cublas_linear, small_batch_linear, tuned_linear, tuning_key

    in_features, out_features = shape
    weight_bytes = in_features * out_features * dtype.itemsize
    copies = max(2, min(CALLS_PER_GRAPH, -(-L2_FLUSH_BYTES // weight_bytes)))
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=dtype) for _ in range(copies)]
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
    fusions = fusions_for(fusion, rows, in_features, out_features, dtype)
    calls = CALLS_PER_GRAPH

    def timed(fn: Callable[[torch.Tensor], object]) -> float:
        return time_in_graph([lambda w=weights[i % copies]: fn(w) for i in range(calls)])

    result = {
        "in": in_features,
        "out": out_features,
        "rows": rows,
        "fusion": fusion,
        "cublas_us": timed(lambda w: cublas_linear(x, w, None, fusions)),
        "triton_us": timed(lambda w: small_batch_linear(x, w, fusions=fusions)),
        "tuned_us": timed(lambda w: tuned_linear(x, w, fusions=fusions)),
        "tuned": str(_fastest[tuning_key(x, weights[0], None, fusions)] or "unfused"),
        "weight_bytes": weight_bytes,
    }
    reference = cublas_linear(x.float(), weights[0].float(), None, fusions_for_float(fusions))
    error = (small_batch_linear(x, weights[0], fusions=fusions).float() - reference).abs().max().item()
    result["max_abs_err"] = error
    if sweep:
        best = None
        for tiles in tile_grid(rows, in_features, splits):
            try:
                us = timed(lambda w, t=tiles: small_batch_linear(x, w, tiles=t, fusions=fusions))
            except Exception as err:  # a tile shape the compiler rejects (registers, shared memory)
                print(f"  {tiles}: {type(err).__name__}", file=sys.stderr)
                continue
            if best is None or us < best[0]:
                best = (us, str(tiles))
        result["best_us"], result["best_tiles"] = best
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--rows", default="1,2,4,8,16,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile shapes")
    parser.add_argument(
        "--fusion",
        default="none",
        choices=["none", "norm", "residual"],
        help="time the GEMV with this fusion (and cuBLAS with the unfused kernels around it)",
    )
    parser.add_argument(
        "--split-k",
        default="1",
        type=lambda s: [int(x) for x in s.split(",")],
        help="split-K run counts the sweep tries with each tile, e.g. 1,2,4",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("small_batch_linear.py needs a CUDA device", file=sys.stderr)
        return 2
    shapes = linear_shapes(args.model)
    print(f"{args.model} bf16 linear layers on {device_name(torch.device('cuda'))}")
    print(
        f"{'in x out':>14} {'per step':>8} {'rows':>4} {'cuBLAS us':>9} {'triton us':>9} {'tuned us':>8} "
        f"{'TB/s cuBLAS/tuned':>17}  tuned choice (best of sweep)"
    )
    results = []
    totals: collections.Counter[tuple[int, str]] = collections.Counter()
    for (shape, count), rows in itertools.product(shapes.items(), args.rows):
        r = measure(shape, rows, torch.bfloat16, args.sweep, args.split_k, args.fusion)
        r["per_step"] = count
        results.append(r)
        totals[(rows, "cublas")] += count * r["cublas_us"]
        totals[(rows, "tuned")] += count * r["tuned_us"]
        best = f" ({r['best_us']:.2f} {r['best_tiles']})" if args.sweep else ""
        bandwidth = [r["weight_bytes"] / us / 1e6 for us in (r["cublas_us"], r["tuned_us"])]
        print(
            f"{shape[0]:>6} x {shape[1]:<6} {count:>8} {rows:>4} {r['cublas_us']:>9.2f} {r['triton_us']:>9.2f} "
            f"{r['tuned_us']:>8.2f} {bandwidth[0]:>8.2f}/{bandwidth[1]:<8.2f}  {r['tuned']}{best}",
            flush=True,
        )
    for rows in args.rows:
        print(
            f"rows {rows}: linear layers per step, cuBLAS {totals[(rows, 'cublas')]:.0f} us, "
            f"tuned {totals[(rows, 'tuned')]:.0f} us"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
