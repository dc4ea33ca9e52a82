"""benchmarks/engine_decode.py on the CPU: one run of tiny-llama writes every batch size's step times in both
modes, the floor and the engine's set-up time, with the engine options it was given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_decode.py"


def test_writes_both_modes_floor_and_setup_time(tmp_path):
    out = tmp_path / "decode.json"
    args = ["--model", "tiny-llama", "--batch-sizes", "1,3", "--context", "12", "--new-tokens", "4"]
    args += ["--repeats", "1", "--extend-graph-max-tokens", "0", "--passes", "fuse_rope_kv_store=0"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["args"]["extend_graph_max_tokens"] == 0
    assert report["setup_s"] > 0
    assert [row["batch"] for row in report["results"]] == [1, 3]
    for row in report["results"]:
        assert row["in order"] > 0 and row["overlapped"] > 0 and row["floor_ms"] > 0
    assert "set up in" in result.stdout and "extend: off" in result.stdout
