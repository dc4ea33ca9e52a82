"""benchmarks/startup.py on the CPU: a cold process misses the FX graph cache, the warm one after it only hits,
the compile work inside each is reported, and --bytecode-cache makes the processes write Python's bytecode
there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "startup.py"


def test_cold_then_warm_processes_with_a_bytecode_cache(tmp_path):
    out, bytecode = tmp_path / "startup.json", tmp_path / "pyc"
    command = [sys.executable, str(SCRIPT), "--model", "tiny-llama", "--warm-runs", "1"]
    command += [
        "--cache-dir",
        str(tmp_path / "inductor"),
        "--bytecode-cache",
        str(bytecode),
        "--json",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    print(result.stdout)
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["cold", "warm 1"]
    for run in runs.values():
        assert set(run["phases"]) == {"import torch", "import radixc", "LLM(...)", "first generate"}
        assert all(seconds > 0 for seconds in run["phases"].values())
        assert run["process_wall"] > run["first_tokens"] > 0
        assert set(run["parts"]) == {
            "Dynamo",
            "of it backend",
            "tuner compiles",
            "of them waited",
            "tuner timing",
            "graph warm-up",
            "graph capture",
        }
        assert run["phases"]["LLM(...)"] + run["phases"]["first generate"] > run["parts"]["Dynamo"] > 0
        assert run["parts"]["Dynamo"] > run["parts"]["of it backend"] > 0
    # the CPU (the native backend) compiles no Triton kernel, times no tuning candidates, captures no CUDA graphs
    assert all(run["triton_compiles"] == {} for run in runs.values())
    assert all(
        runs["cold"]["parts"][p] == 0
        for p in ("tuner compiles", "of them waited", "tuner timing", "graph capture")
    )
    assert runs["cold"]["fx_graph_cache"]["miss"] >= 1 and runs["cold"]["fx_graph_cache"]["hit"] == 0
    assert runs["warm 1"]["fx_graph_cache"]["hit"] >= 1 and runs["warm 1"]["fx_graph_cache"]["miss"] == 0
    assert any(bytecode.rglob("torch/__init__*.pyc")), "no bytecode of torch was written to --bytecode-cache"


def test_refuses_no_warm_run():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--warm-runs", "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "--warm-runs must be at least 1" in result.stderr


RECORD = """
import importlib.util, json, os, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from radixc.ops.triton import activation

spec = importlib.util.spec_from_file_location("startup", sys.argv[1])
startup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(startup)
compiles = startup.record_triton_compiles()
kernel = activation._silu_and_mul_kernel
signature = {name: "*bf16" if name in ("GateUp", "Out") else "i32" for name in kernel.arg_names}
constexprs = {name: 64 for name in kernel.arg_names if name.startswith("BLOCK")}
signature.update(dict.fromkeys(constexprs, "constexpr"))
with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
    for cache in (first, second, second):  # two compiles, then a cache hit
        os.environ["TRITON_CACHE_DIR"] = cache
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
print(json.dumps(compiles))
"""


def test_the_compile_record_counts_each_triton_compile_by_kernel_and_no_cache_hit():
    """The child's record of radixc's Triton compiles, fed by a real compile for sm90 (no GPU needed, outside
    the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", RECORD, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compiles = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(compiles) == ["_silu_and_mul_kernel"]
    assert compiles["_silu_and_mul_kernel"]["count"] == 2 and compiles["_silu_and_mul_kernel"]["seconds"] > 0
