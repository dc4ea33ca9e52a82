"""Seconds to compile the GDN chunked-prefill kernels for a Hopper GPU (sm90), on this machine's CPU: no GPU needed.

A hybrid model's first prefill waits for these compiles (Triton compiles on first launch), so they are part of
its cold start. Each kernel compiles into a fresh Triton cache, with the constexprs `chunk_gated_delta_rule`
gives it for the head dims and dtype asked; prints a Markdown table (seconds, PTX lines, tensor-core and FMA
instructions). Run without `TRITON_INTERPRET`, e.g. `python3 benchmarks/chunk_compile.py --k-dim 128 --v-dim 128`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radixc.ops.triton import gdn_chunk
from radixc.ops.triton._utils import pow2_block

CHUNK = 64


def compile_seconds(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, **options):
    """(seconds, PTX) of compiling kernel for sm90 into an empty cache: pointer arguments typed by name, floats
    as fp32, other arguments as i32; specialised as a launch with qwen3.5's shapes is (pointers 16-byte aligned,
    every integer but the request count, the GQA group and the flags a multiple of 16)."""
    signature = {name: pointers.get(name, "fp32" if name in floats else "i32") for name in kernel.arg_names}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    unspecialised = {*floats, "num_reqs", "group_size"}
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(kernel.arg_names)
        if name not in constexprs and name not in unspecialised
    }
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        started = time.perf_counter()
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options
        )
        return time.perf_counter() - started, compiled.asm["ptx"]


def cases(k_dim: int, v_dim: int, half: bool) -> dict[str, tuple]:
    """The three kernels' arguments as `chunk_gated_delta_rule` launches them."""
    act = "*bf16" if half else "*fp32"
    block_k, block_v = pow2_block(k_dim), pow2_block(v_dim)
    wide = max(block_k, block_v) >= 128
    shared = dict(K_DIM=k_dim, V_DIM=v_dim, BLOCK_T=CHUNK, BLOCK_K=block_k, USE_L2NORM=True)
    precision = "tf32" if half else "ieee"
    index = dict.fromkeys(
        ("StartLoc", "ExtendLens", "BlockReq", "BlockIdx", "GdnSlots", "ChunkStarts"), "*i32"
    )
    prepare = dict(index, K=act, V=act, G="*fp32", Beta=act, W="*fp32", Uv="*fp32", GCum="*fp32")
    state = dict(index, K=act, W="*fp32", Uv="*fp32", GCum="*fp32", ChunkStates=act, SsmState="*fp32")
    state["HasInitialState"] = "*i1"
    output = dict(index, Q=act, K=act, U="*fp32", GCum="*fp32", ChunkStates=act, Out=act)
    return {
        "_chunk_prepare_kernel": (
            prepare,
            ("eps",),
            dict(
                shared,
                BLOCK_V=block_v,
                DOT_PRECISION=precision,
                GRAM_PRECISION="tf32x3" if half else "ieee",
            ),
            dict(num_warps=4, num_stages=1),
        ),
        "_chunk_state_kernel": (
            state,
            ("eps",),
            dict(shared, BLOCK_V=min(block_v, 4096 // block_k), DOT_PRECISION=precision),
            dict(num_warps=8 if wide else 4, num_stages=2 if block_k <= 128 else 1),
        ),
        "_chunk_output_kernel": (
            output,
            ("scale", "eps"),
            dict(shared, BLOCK_V=min(block_v, 64), DOT_PRECISION=precision),
            dict(num_warps=8 if wide else 4, num_stages=2),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k-dim", type=int, default=128, help="key head dim (qwen3.5: 128)")
    parser.add_argument("--v-dim", type=int, default=128, help="value head dim (qwen3.5: 128)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter compiles nothing")
    print(
        f"triton {triton.__version__}, sm90, heads {args.k_dim} x {args.v_dim}, chunk {CHUNK}, {args.dtype}"
    )
    print("| kernel | compile, s | PTX lines | mma | fma.f32 |\n|---|---:|---:|---:|---:|")
    for name, (pointers, floats, constexprs, options) in cases(
        args.k_dim, args.v_dim, args.dtype == "bfloat16"
    ).items():
        seconds, ptx = compile_seconds(getattr(gdn_chunk, name), pointers, floats, constexprs, **options)
        mma = ptx.count("mma.sync") + ptx.count("wgmma.mma_async")
        print(f"| `{name}` | {seconds:.1f} | {ptx.count(chr(10)):,} | {mma} | {ptx.count('fma.rn.f32')} |")


if __name__ == "__main__":
    main()
