"""benchmarks/chunk_compile.py on the CPU: the three GDN chunk kernels compile for sm90 without a GPU, and the
prepare kernel's solve runs as float32 FMAs beside its tensor-core key products (half-precision inputs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "chunk_compile.py"


def _run(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_the_chunk_kernels_compile_for_sm90_and_the_solve_uses_fma():
    # small heads keep the compiles short; the solve's [16, 16] products do not depend on them
    result = _run("--k-dim", "32", "--v-dim", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    rows = {
        cells[1].strip("` "): [float(cell.replace(",", "")) for cell in cells[2:6]]
        for line in result.stdout.splitlines()
        if line.startswith("| `")
        for cells in [line.split("|")]
    }
    assert set(rows) == {"_chunk_prepare_kernel", "_chunk_state_kernel", "_chunk_output_kernel"}
    assert all(seconds > 0 and lines > 0 for seconds, lines, _, _ in rows.values())
    _, _, mma, fma = rows["_chunk_prepare_kernel"]
    # A's key products on tensor cores; the chained solve (over 1,000 FMAs a thread) off them
    assert mma > 0 and fma > 1000


def test_the_interpreter_is_refused():
    result = _run(interpret=True)
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr
