"""radixc-bench on a tiny preset (one batch size, a short context, few steps, no compile probe), its error
exits, the compile probe's process plumbing with a recording runner, and the decode floor's bytes by hand."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from radixc.models import build_preset
from radixc.tools import bench_compile
from radixc.tools.bench import main
from radixc.tools.bench_compile import PROBE_MODULE, ProbeSettings, measure_compile, probe
from radixc.tools.bench_floor import state_bytes, weight_bytes
from radixc.tools.bench_steps import BenchError

MODEL, BATCH, CONTEXT = "tiny-llama", 2, 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One fast run of the tool: (exit code, stdout, JSON report)."""
    report = tmp_path_factory.mktemp("bench") / "report.json"
    argv = [
        "--model",
        MODEL,
        "--batch-sizes",
        str(BATCH),
        "--context",
        str(CONTEXT),
        "--steps",
        "3",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--skip-compile-probe",
        "--device",
        "cpu",
        "--json",
        str(report),
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    yield code, stdout.getvalue(), json.loads(report.read_text()) if report.exists() else {}
    torch._dynamo.reset()


def test_main_writes_a_json_report_with_positive_timings(run):
    code, text, report = run
    assert code == 0
    assert text.startswith(f"radixc-bench: {MODEL} (LlamaForCausalLM")
    assert (report["model"], report["device"], report["compile"]) == (MODEL, "cpu", None)
    assert report["copy_bandwidth_gb_per_s"] > 0
    assert report["compiled_graphs"] == 2  # one graph per forward mode
    [row] = report["rows"]
    assert (row["batch_size"], row["context"]) == (BATCH, CONTEXT)
    for mode in ("eager", "compiled"):
        assert row["prefill_tokens_per_s"][mode] > 0
        assert row["decode_ms_per_step"][mode] > 0
        assert 0 < row["decode_host_ms_per_step"][mode] <= row["decode_ms_per_step"][mode]
        assert row["ratio_to_floor"][mode] > 0
    assert row["floor"]["weight_bytes"] > 0 and row["floor"]["state_bytes"] > 0
    assert row["floor"]["ms_per_step"] > 0


def test_cuda_graph_column_says_why_it_is_empty_off_cuda(run):
    _, text, report = run
    assert report["rows"][0]["decode_ms_per_step"]["compiled_cuda_graphs"] == "n/a (cpu)"
    assert "compiled_cuda_graphs" not in report["rows"][0]["ratio_to_floor"]
    assert "n/a (cpu)" in text.split("decode, ms/step")[1]


def test_transformers_comparison_is_a_number_or_an_error_text(run):
    _, _, report = run
    row = report["rows"][0]
    peer = row["decode_ms_per_step"]["transformers"]
    if importlib.util.find_spec("transformers") is None:
        assert peer.startswith("n/a")
    elif isinstance(peer, str):
        assert peer and "transformers" not in row["ratio_to_floor"]
    else:
        assert peer > 0 and row["ratio_to_floor"]["transformers"] > 0


def test_an_unknown_preset_exits_non_zero_naming_it(capsys):
    assert main(["--model", "no-such-preset", "--skip-compile-probe"]) == 2
    err = capsys.readouterr().err
    assert (
        "radixc-bench: error: model 'no-such-preset' is neither a checkpoint directory nor a preset" in err
        and "tiny-llama" in err
    )


def test_a_context_beyond_the_model_exits_non_zero(capsys):
    # tiny presets have max_position_embeddings 512
    assert main(["--model", MODEL, "--context", "600", "--skip-compile-probe", "--no-peer"]) == 2
    assert "max_context_len" in capsys.readouterr().err


def test_bad_batch_sizes_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", MODEL, "--batch-sizes", "1,zero"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_fails_before_measuring(capsys, tmp_path):
    assert main(["--model", MODEL, "--plot", str(tmp_path / "out.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_compile_probe_runs_cold_then_warm_processes_on_one_new_cache_dir():
    calls = []

    def record(command, env, **kwargs):
        cache = Path(env["TORCHINDUCTOR_CACHE_DIR"])
        calls.append((command, dict(env), cache.exists() and any(cache.iterdir())))
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"entry{len(calls)}").write_text("compiled")
        capture = 2.0 if len(calls) == 1 else None  # the probe reports None where nothing was captured
        times = {"extend_s": 1.5 * len(calls), "decode_s": 0.5 * len(calls), "capture_s": capture}
        stdout = json.dumps({**times, "imports_s": 4.0, "load_s": 0.25 * len(calls)})
        stdout += "\n"
        return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    settings = ProbeSettings("tiny-llama", None, "cpu", "auto", batch_size=1, context=16, threads=1)
    times = measure_compile(settings, run=record)
    (cold_cmd, cold_env, cold_had_entries), (warm_cmd, warm_env, warm_had_entries) = calls
    assert cold_cmd[:-1] == warm_cmd[:-1] and cold_cmd[1:3] == ["-m", PROBE_MODULE]
    assert cold_cmd[3:-2] == settings.argv() and "--threads" in cold_cmd
    assert cold_cmd[-2] == "--spawned-at" and float(cold_cmd[-1]) <= float(warm_cmd[-1]) <= time.time()
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert cold_env[key] == warm_env[key] != os.environ.get(key)
    assert (cold_had_entries, warm_had_entries) == (False, True)
    assert not Path(cold_env["TORCHINDUCTOR_CACHE_DIR"]).parent.exists()  # removed afterwards
    assert (times.cold.extend_s, times.cold.decode_s, times.warm.extend_s) == (1.5, 0.5, 3.0)
    assert (times.cold.capture_s, times.warm.capture_s) == (2.0, None)
    assert times.cold.process_s >= 0
    assert (times.cold.imports_s, times.cold.load_s, times.warm.load_s) == (4.0, 0.25, 0.5)


def test_a_failing_probe_reports_its_stderr():
    def fail(command, env, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="Traceback\nRuntimeError: boom\n")

    with pytest.raises(BenchError, match="cold compile probe exited 1:\nTraceback\nRuntimeError: boom"):
        measure_compile(ProbeSettings("tiny-llama", None, "cpu", "auto", 1, 16), run=fail)


def test_weight_bytes_count_a_tied_head_fully_and_an_untied_embedding_by_rows():
    tied = build_preset("tiny-llama")  # tied: the embedding table is the LM head, read whole
    assert weight_bytes(tied, 3) == sum(p.numel() for p in tied.parameters()) * 4
    untied = build_preset("tiny-qwen3.5")
    embed = untied.model.embed_tokens.weight
    others = sum(p.numel() for p in untied.parameters()) - embed.numel()
    assert weight_bytes(untied, 3) == (others + 3 * embed.shape[1]) * 4


def test_state_bytes_of_a_hybrid_count_kv_reads_and_gdn_state_read_and_written():
    model = build_preset("tiny-qwen3.5")
    spec = model.kv_cache_spec()
    contexts = [int(n) for n in torch.randint(5, 200, (3,))]
    # tiny-qwen3.5: one attention layer (2 KV heads of dim 16); three GDN layers, conv dim 2*2*16 + 4*8 = 96,
    # kernel 4, recurrent state 4 v-heads x 16 x 8 float32
    kv = sum(contexts) * 2 * (16 + 16) * 4
    gdn = 3 * (96 * 3 * 4 + 4 * 16 * 8 * 4)
    assert state_bytes(spec, torch.float32, contexts) == kv + 2 * len(contexts) * gdn


def test_state_bytes_of_a_sliding_layer_stop_at_its_window():
    spec = build_preset("tiny-gemma2").kv_cache_spec()  # layer 0 slides over 8 tokens, layer 1 is global
    per_token = 2 * (16 + 16) * 4
    assert state_bytes(spec, torch.float32, [5, 30]) == (5 + 8) * per_token + (5 + 30) * per_token


def test_the_probe_times_first_calls_and_reports_no_capture_off_cuda():
    result = probe(ProbeSettings("tiny-llama", None, "cpu", "native", batch_size=1, context=8, threads=1))
    assert result["extend_s"] > 0 and result["decode_s"] > 0 and result["load_s"] > 0
    assert result["capture_s"] is None
    torch._dynamo.reset()


def test_the_probe_process_reports_the_seconds_from_its_spawn_to_its_first_line(capsys):
    argv = ["--model", "tiny-llama", "--device", "cpu", "--backend", "native", "--batch-size", "1"]
    argv += ["--context", "8", "--threads", "1", "--spawned-at", repr(time.time() - 5.0)]
    assert bench_compile.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 5.0 <= result["imports_s"] < 60 and result["load_s"] > 0
    torch._dynamo.reset()
