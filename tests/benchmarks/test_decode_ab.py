"""benchmarks/decode_ab.py on the CPU: variants parsed from their text, run interleaved in fresh engine_decode
processes with their environment and arguments, summarized against the first."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_ab.py"


@pytest.fixture(scope="module")
def ab_script():
    spec = importlib.util.spec_from_file_location("benchmark_decode_ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


def test_a_variant_is_a_name_environment_and_arguments(ab_script):
    variant = ab_script.parse_variant("no split-K: RADIXC_GEMV_SPLIT_K=0 RADIXC_PDL=0 --passes a=0,b=1")
    assert variant == ab_script.Variant(
        "no split-K", {"RADIXC_GEMV_SPLIT_K": "0", "RADIXC_PDL": "0"}, ["--passes", "a=0,b=1"]
    )
    assert ab_script.parse_variant("default") == ab_script.Variant("default", {}, [])
    with pytest.raises(argparse.ArgumentTypeError, match="'FOO' is not an ENV=value assignment"):
        ab_script.parse_variant("broken: FOO --passes a=0")
    with pytest.raises(argparse.ArgumentTypeError, match="has no name"):
        ab_script.parse_variant(": RADIXC_PDL=0")


def test_runs_every_variant_each_round_and_compares_with_the_first(tmp_path):
    out = tmp_path / "ab.json"
    command = [sys.executable, str(SCRIPT), "--rounds", "1", "--json", str(out)]
    command += ["--variant", "default", "--variant", "unfused rope: --passes fuse_rope_kv_store=0"]
    command += ["--model", "tiny-llama", "--batch-sizes", "1,2", "--context", "8", "--new-tokens", "3"]
    command += ["--repeats", "1", "--extend-graph-max-tokens", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [len(report["runs"][name]) for name in ("default", "unfused rope")] == [1, 1]
    assert report["runs"]["unfused rope"][0]["args"]["passes"] == "fuse_rope_kv_store=0"
    summary = report["summary"]
    assert [(row["batch"], row["variant"]) for row in summary] == [
        (1, "default"),
        (1, "unfused rope"),
        (2, "default"),
        (2, "unfused rope"),
    ]
    for row in summary:
        run = report["runs"][row["variant"]][0]
        assert row["overlapped_ms"] == next(
            r["overlapped"] for r in run["results"] if r["batch"] == row["batch"]
        )
    assert [row["vs_first"] for row in summary if row["variant"] == "default"] == [1.0, 1.0]


def test_a_failing_variant_names_itself():
    command = [sys.executable, str(SCRIPT), "--rounds", "1", "--variant", "default"]
    command += ["--variant", "bad switch: --passes no_such_pass=1", "--model", "tiny-llama"]
    command += ["--batch-sizes", "1", "--context", "8", "--new-tokens", "2", "--repeats", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "variant 'bad switch': engine_decode failed" in result.stderr
    assert "no_such_pass" in result.stderr
