"""benchmarks/kernels.py on the CPU: its CLI (help, refusal without CUDA, bad families), the ratios and Markdown it
reports, and that its radixc-Triton and native cases call the kernels consistently (under the interpreter)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


@pytest.fixture(scope="module")
def kernels():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on the GPU machine
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_help_names_every_option():
    result = _run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--json", "--markdown", "--families"):
        assert option in result.stdout


def test_refuses_clearly_without_cuda(tmp_path):
    report = tmp_path / "report.json"
    result = _run_script("--quick", "--json", str(report))
    assert result.returncode == 2
    assert "needs a CUDA device" in result.stderr
    assert not report.exists()


def test_rejects_unknown_families():
    result = _run_script("--families", "decode,flash")
    assert result.returncode == 2
    assert "unknown flash" in result.stderr


def test_ratios_are_against_the_best_peer_and_failures_stay_in_their_row(kernels):
    rows = [
        kernels.Row("decode", "1x1024", "radixc-triton", 4e6, "GB/s", plain_us=30.0, graph_us=12.0),
        kernels.Row("decode", "1x1024", "flashinfer", 4e6, "GB/s", plain_us=20.0, graph_us=8.0),
        kernels.Row("decode", "1x1024", "flashinfer-tc", 4e6, "GB/s", plain_us=15.0, graph_us=10.0),
        kernels.Row("decode", "1x1024", "native", 4e6, "GB/s", plain_us=300.0, error="graph: not capturable"),
    ]
    kernels._fill_ratios(rows)
    assert rows[0].ratio_plain == pytest.approx(2.0) and rows[0].ratio_graph == pytest.approx(1.5)
    assert rows[3].ratio_graph is None
    ceilings = kernels.Ceilings(copy_gb_per_s=1000.0, matmul_tflops=500.0)
    report = {
        "command": "python benchmarks/kernels.py --quick",
        "device": "test device",
        "versions": {"torch": torch.__version__},
        "dtype": "bf16",
        "page_size": 16,
        "copy_gb_per_s": 1000.0,
        "matmul_tflops": 500.0,
        "seconds": 1.0,
        "rows": [kernels._row_json(r, ceilings) for r in rows],
    }
    # 4 MB in 8 µs is 500 GB/s: half the copy ceiling
    assert report["rows"][1]["graph_rate"] == pytest.approx(500.0)
    assert report["rows"][1]["graph_pct_of_ceiling"] == pytest.approx(50.0)
    markdown = kernels.render_markdown(report)
    assert "## decode" in markdown and "graph: not capturable" in markdown
    assert "| 1x1024 | radixc-triton | 30.0 | 12.0 | 333.3 | 33 | 2.00 | 1.50 |" in markdown


@pytest.mark.triton
def test_radixc_and_native_cases_compute_the_same_outputs(kernels):
    """The cases' radixc-Triton and native setups agree, so the benchmark's plumbing of each kernel is right (on
    the GPU when there is one: Triton kernels need CUDA tensors there)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    heads = (4, 2, 32)  # small heads keep the interpreter quick; the kernels' calls are the same
    builds = [
        lambda: kernels.decode_impls(2, 40, heads, torch.float32, device, gen),
        lambda: kernels.extend_impls(1, 8, 16, heads, torch.float32, device, gen),
        lambda: kernels.gdn_prefill_impls(1, 20, torch.float32, device, heads=(2, 2, 32)),
        lambda: kernels.gdn_decode_impls(2, torch.float32, device, heads=(2, 2, 32)),
    ]
    for build in builds:
        impls, work = build()
        assert work > 0
        outputs = {impl.name: impl.setup()[1] for impl in impls if impl.name in ("radixc-triton", "native")}
        assert set(outputs) == {"radixc-triton", "native"}
        torch.testing.assert_close(outputs["radixc-triton"], outputs["native"], atol=1e-4, rtol=1e-4)
