"""A second process compiling the same radixc module hits the FX graph cache; changing a pass switch misses."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

PROBE = pathlib.Path(__file__).with_name("fx_cache_probe.py")


def compile_in_fresh_process(cache_dir, *args) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    result = subprocess.run(
        [sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_fx_graph_cache_and_a_pass_switch_invalidates_it(tmp_path):
    cold = compile_in_fresh_process(tmp_path)
    warm = compile_in_fresh_process(tmp_path)
    switched = compile_in_fresh_process(tmp_path, "fuse_rope_kv_store")
    print(f"compile seconds: cold {cold['seconds']:.2f}, warm {warm['seconds']:.2f}")
    assert cold.get("fxgraph_cache_miss", 0) >= 1 and not cold.get("fxgraph_cache_hit")
    assert warm.get("fxgraph_cache_hit", 0) >= 1 and not warm.get("fxgraph_cache_miss")
    assert switched.get("fxgraph_cache_miss", 0) >= 1  # the pass manager's uuid changed with the switch
