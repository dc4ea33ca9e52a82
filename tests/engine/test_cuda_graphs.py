"""CUDA-graph steps on the CPU: the buckets, the static buffers and the padded batches (everything but the
capture itself) give the logits and tokens of unpadded decode and extend steps, for dense and hybrid models."""

from __future__ import annotations

import random

import pytest
import torch

import radixc
from radixc.engine.cuda_graphs import DecodeGraphs, ExtendGraphs, capture_batch_sizes, extend_token_buckets
from radixc.engine.runner import activation_bytes, build_runner, cuda_graph_bytes

from .conftest import random_prompts, tiny_model


def test_buckets_are_powers_of_two_to_eight_then_multiples_of_eight_up_to_the_maximum() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert capture_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]


def test_extend_buckets_are_powers_of_two_from_16_up_to_the_maximum() -> None:
    assert extend_token_buckets(8) == [8]
    assert extend_token_buckets(16) == [16]
    assert extend_token_buckets(100) == [16, 32, 64, 100]
    assert extend_token_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]


def _runner(model, padded: bool, compile: bool, extend_max_tokens: int = 64, backend: str = "native"):
    runner = build_runner(
        model,
        backend=backend,
        compile=compile,
        page_size=4,
        max_batch_size=12,
        max_context_len=96,
        kv_memory_bytes=1 << 22,
    )
    if padded:
        runner.decode_graphs = DecodeGraphs(runner._forward, runner.builder, 12, capture=False)
        runner.extend_graphs = ExtendGraphs(
            runner._forward, runner.builder, 12, extend_max_tokens, capture=False
        )
    return runner


def _decode_trace(runner, prompts: list[list[int]], steps: int, seed: int) -> tuple[list[torch.Tensor], list]:
    """Extend every prompt, then decode random subsets (batch sizes between buckets), releasing some requests on the
    way so rows and pages are reused; returns every decode step's logits and the greedy tokens."""
    rng = random.Random(seed)
    requests = [runner.builder.new_request() for _ in prompts]
    last = dict(enumerate(runner.extend(requests, prompts).argmax(-1).tolist()))
    live = list(range(len(prompts)))
    logits_trace, tokens = [], []
    for step in range(steps):
        chosen = sorted(rng.sample(live, rng.randint(1, len(live))))
        logits = runner.decode([requests[i] for i in chosen], [last[i] for i in chosen])
        logits_trace.append(logits.clone())
        for i, token in zip(chosen, logits.argmax(-1).tolist()):
            last[i] = token
        tokens.append([last[i] for i in chosen])
        if step == steps // 2:  # a finished request leaves; its row, pages and slot go back to the pools
            gone = live.pop(rng.randrange(len(live)))
            runner.builder.release(requests[gone])
    return logits_trace, tokens


@pytest.mark.parametrize(
    ("preset", "compile"), [("tiny-llama", True), ("tiny-qwen3.5", True), ("tiny-qwen3-next", False)]
)
def test_padded_static_decode_equals_unpadded_decode(preset: str, compile: bool) -> None:
    model = tiny_model(preset)
    prompts = random_prompts(11, 3, 20, seed=5)
    plain_logits, plain_tokens = _decode_trace(_runner(model, False, compile), prompts, 12, seed=9)
    padded = _runner(model, True, compile)
    padded_logits, padded_tokens = _decode_trace(padded, prompts, 12, seed=9)
    assert padded_tokens == plain_tokens
    for plain, pad in zip(plain_logits, padded_logits):
        assert pad.shape == plain.shape
        # float32: a padded batch's matmuls have more rows, for which BLAS may sum in another order (3.7e-5 seen
        # on one host's CPU); a padded row leaking into the others would move logits by their whole scale
        torch.testing.assert_close(pad, plain, rtol=1e-4, atol=1e-4)
    assert padded.decode_graphs.captured_sizes == []  # nothing is captured without CUDA


def test_the_decode_batch_past_the_largest_bucket_is_refused_by_name() -> None:
    runner = _runner(tiny_model("tiny-llama"), True, False)
    with pytest.raises(ValueError, match="exceeds the largest CUDA-graph bucket 12"):
        runner.decode_graphs.bucket(13)


def test_asking_for_cuda_graphs_where_they_cannot_run_says_why() -> None:
    with pytest.raises(
        ValueError, match="cuda_graphs=True: CUDA graphs need a CUDA device; the model is on cpu"
    ):
        radixc.LLM("tiny-llama", device="cpu", compile=False, cuda_graphs=True)
    llm = radixc.LLM("tiny-llama", device="cpu", compile=False)
    assert llm.runner.decode_graphs is None  # off by default where capture cannot run


def _poison_padding_slot(runner) -> None:
    """NaN in the reserved KV slot 0 of every attention layer."""
    for layer_id in runner.spec.full_attention_layer_ids:
        for buffer in runner.kv_pool.layer_buffers(layer_id):
            buffer[0] = float("nan")


def _mixed_trace(runner, prompts: list[list[int]], seed: int, max_steps: int = 40) -> list[torch.Tensor]:
    """Prompts extended in random chunks (later chunks continue a prefix, some steps too long for any extend
    bucket) between decode steps of random subsets, requests leaving on the way; every step's logits."""
    rng = random.Random(seed)
    requests = [runner.builder.new_request() for _ in prompts]
    done = [0] * len(prompts)  # prompt tokens extended so far
    last: dict[int, int] = {}
    trace = []
    live = list(range(len(prompts)))
    while live:
        pending = [i for i in live if done[i] < len(prompts[i])]
        if pending and rng.random() < 0.6:
            chosen = sorted(rng.sample(pending, rng.randint(1, len(pending))))
            chunks = []
            for i in chosen:
                end = min(len(prompts[i]), done[i] + rng.randint(1, 40))
                chunks.append(prompts[i][done[i] : end])
                done[i] = end
            logits = runner.extend([requests[i] for i in chosen], chunks)
        else:
            chosen = sorted(rng.sample([i for i in live if i in last], rng.randint(1, len(last))))
            if not chosen:
                continue
            logits = runner.decode([requests[i] for i in chosen], [last[i] for i in chosen])
        trace.append(logits.clone())
        for i, token in zip(chosen, logits.argmax(-1).tolist()):
            if done[i] == len(prompts[i]):
                last[i] = token
        if len(trace) % 7 == 0 and last:  # a finished request leaves; its row, pages and slot go back
            gone = rng.choice(sorted(last))
            live.remove(gone)
            del last[gone]
            runner.builder.release(requests[gone])
        if len(trace) >= max_steps:
            break
    return trace


@pytest.mark.parametrize(
    ("preset", "compile"), [("tiny-llama", True), ("tiny-qwen3.5", True), ("tiny-qwen3-next", False)]
)
def test_padded_static_extend_equals_unpadded_extend(preset: str, compile: bool) -> None:
    model = tiny_model(preset)
    prompts = random_prompts(9, 10, 70, seed=6)
    plain_runner, padded_runner = _runner(model, False, compile), _runner(model, True, compile)
    for runner in (plain_runner, padded_runner):  # padding writes there: what it holds must never reach a row
        _poison_padding_slot(runner)
    plain = _mixed_trace(plain_runner, prompts, seed=8)
    padded = _mixed_trace(padded_runner, prompts, seed=8)
    assert len(padded) == len(plain) > 10
    for plain_logits, padded_logits in zip(plain, padded, strict=True):
        assert padded_logits.shape == plain_logits.shape
        # padded row counts change how the CPU's matmuls block their sums (and the two runners may replay graphs
        # compiled for other shapes first): float32 rounding, far below what a row of the wrong request gives
        torch.testing.assert_close(padded_logits, plain_logits, rtol=1e-3, atol=1e-3)
    assert padded_runner.extend_graphs.captured_sizes == []  # nothing is captured without CUDA


@pytest.mark.triton
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3.5"])
def test_triton_kernels_ignore_padding_tokens_and_empty_padding_requests(preset: str) -> None:
    """The Triton kernels (in-kernel block lookup, GDN chunks, conv1d) on padded static batches: empty requests
    after the real ones, and tokens of no request, change no real row."""
    model = tiny_model(preset).to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = random_prompts(3, 5, 24, seed=12)
    traces = [
        _mixed_trace(
            _runner(model, padded, False, extend_max_tokens=32, backend="triton"),
            prompts,
            seed=3,
            max_steps=10,
        )
        for padded in (False, True)
    ]
    for plain_logits, padded_logits in zip(*traces, strict=True):
        torch.testing.assert_close(padded_logits, plain_logits, rtol=1e-4, atol=1e-4)


def test_an_extend_step_longer_than_every_bucket_runs_uncaptured() -> None:
    runner = _runner(tiny_model("tiny-llama"), True, False, extend_max_tokens=32)
    graphs = runner.extend_graphs
    prompts = random_prompts(3, 20, 21, seed=2)  # 60 tokens: more than the largest bucket
    assert graphs.holds(prompts[:1]) and not graphs.holds(prompts)
    with pytest.raises(ValueError, match="exceeds the largest CUDA-graph bucket \\(32 tokens\\)"):
        graphs.run([runner.builder.new_request() for _ in prompts], prompts)
    requests = [runner.builder.new_request() for _ in prompts]
    logits = runner.extend(requests, prompts)  # the compiled model directly
    reference = _runner(tiny_model("tiny-llama"), False, False)
    expected = reference.extend([reference.builder.new_request() for _ in prompts], prompts)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_the_graph_memory_estimate_covers_every_logits_buffer_and_grows_with_the_captured_tokens() -> None:
    model = tiny_model("tiny-llama")
    vocab = model.config.vocab_size
    decode_only = cuda_graph_bytes(model, 8, 0)
    assert decode_only >= 2 * 8 * vocab * 4  # the decode set's buffer and the logits in the pool
    assert cuda_graph_bytes(model, 8, 64) >= decode_only + 8 * vocab * 4  # the extend set's buffer too
    assert cuda_graph_bytes(model, 8, 2048) > cuda_graph_bytes(model, 8, 64)


def test_extend_graph_limits_that_cannot_hold_say_why() -> None:
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="extend_graph_max_tokens=64: CUDA graphs are off"):
        build_runner(model, backend="native", compile=False, extend_graph_max_tokens=64)
    with pytest.raises(ValueError, match="extend_graph_max_tokens must be >= 0, got -1"):
        radixc.LLM("tiny-llama", device="cpu", compile=False, cuda_graphs=False, extend_graph_max_tokens=-1)


@pytest.mark.parametrize(
    ("mode", "max_size", "expected"),
    [("decode", 48, [48, 32]), ("decode", 12, [12]), ("extend", 64, [64, 32]), ("extend", 16, [16])],
)
def test_tuning_warm_up_runs_the_largest_bucket_then_the_largest_the_gemv_serves(
    monkeypatch, mode: str, max_size: int, expected: list[int]
) -> None:
    """Before the warm-up runs, `gather_tuning` runs the largest bucket (the graph compiles at the size it always
    has) and the largest bucket of at most SMALL_BATCH_MAX_ROWS tokens under `gathered_tuning`, each once,
    planned for capture first, so that every GEMV shape's candidates compile in one round; once per set."""
    import contextlib

    from radixc.ops.triton import gemv

    runner = _runner(tiny_model("tiny-llama"), padded=False, compile=False)
    if mode == "decode":
        graphs = DecodeGraphs(runner._forward, runner.builder, max_size, capture=True)
    else:
        graphs = ExtendGraphs(runner._forward, runner.builder, 12, max_size, capture=True)
    events, gathering = [], []

    @contextlib.contextmanager
    def recording():
        gathering.append(True)
        yield
        gathering.pop()
        events.append("compiled")

    monkeypatch.setattr(gemv, "gathered_tuning", recording)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(
        graphs, "_prepare_capture", lambda bucket: events.append(("planned", bucket.num_tokens))
    )
    monkeypatch.setattr(
        graphs, "_run", lambda bucket: events.append(("ran", bucket.num_tokens, bool(gathering)))
    )
    graphs.gather_tuning()
    graphs.gather_tuning()
    runs = [step for size in expected for step in (("planned", size), ("ran", size, True))]
    assert events == [*runs, "compiled"]


def test_every_set_compiles_its_graph_and_gathers_its_tuning_before_any_set_captures(monkeypatch) -> None:
    """The runner compiles the extend graphs, then the decode graphs (each `gather_tuning`), and only then
    captures either: the GEMV candidates of the first set compile in the background during the second's graph
    compile."""
    runner = _runner(tiny_model("tiny-llama"), padded=False, compile=False)
    events = []

    class Recorder:
        def __init__(self, name: str):
            self.name = name

        def gather_tuning(self):
            events.append(("gather", self.name))

        def capture(self, progress, pool):
            events.append(("capture", self.name, pool))

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    runner.extend_graphs, runner.decode_graphs = Recorder("extend"), Recorder("decode")
    runner.capture_cuda_graphs(progress=False)
    assert events == [
        ("gather", "extend"),
        ("gather", "decode"),
        ("capture", "extend", "pool"),
        ("capture", "decode", "pool"),
    ]


def test_the_activation_estimate_counts_logits_per_request_not_per_token() -> None:
    model = tiny_model("tiny-llama")
    vocab = model.config.vocab_size
    widths = sorted({p.shape[0] for p in model.parameters() if p.dim() == 2})
    assert widths[-1] == vocab
    per_token = 8 * widths[-2] * 4
    assert activation_bytes(model, 8192, 4) == 8192 * per_token + 4 * 4 * vocab * 4
    assert activation_bytes(model, 8193, 4) - activation_bytes(model, 8192, 4) == per_token
    assert activation_bytes(model, 2, 256) == 2 * per_token + 4 * 2 * vocab * 4
