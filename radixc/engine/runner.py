"""ModelRunner: owns the pools and the BatchBuilder, and runs the model (compiled once) on each step's batch;
`build_runner`, the one place an engine is assembled (cache spec -> limits -> backend -> pools and model)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from radixc.cache_spec import KVCacheSpec
from radixc.engine.backends import AttentionBackend, choose_backend
from radixc.engine.batch_builder import BatchBuilder, RequestMemory
from radixc.engine.config import EngineConfig
from radixc.engine.cuda_graphs import DEFAULT_EXTEND_GRAPH_MAX_TOKENS, DecodeGraphs, ExtendGraphs
from radixc.engine.memory_pool import GDNPool, KVPool, ReqToTokenPool
from radixc.forward_batch import ForwardBatch, ForwardMode
from radixc.ops.attention import AttentionType, RadixAttention
from radixc.ops.linear_attention import RadixLinearAttention
from radixc.ops.pdl import inductor_options

logger = logging.getLogger("radixc.engine")


def compile_model(fn: Callable, device: torch.device) -> Callable:
    """fn compiled as the engine runs it: one graph per forward mode (fullgraph: no graph breaks), and Inductor's
    kernels launched with programmatic dependent launch when `RADIXC_PDL=all` on a device that has it
    (radixc.ops.pdl)."""
    return torch.compile(fn, fullgraph=True, options=inductor_options(device))


def model_cache_spec(model: nn.Module) -> KVCacheSpec:
    """The model's `kv_cache_spec()`, or one read off its RadixAttention / RadixLinearAttention layers."""
    if hasattr(model, "kv_cache_spec"):
        return model.kv_cache_spec()
    attention = [m for m in model.modules() if isinstance(m, RadixAttention)]
    gdn = sorted(
        (m for m in model.modules() if isinstance(m, RadixLinearAttention)), key=lambda m: m.gdn_layer_idx
    )
    if not attention and not gdn:
        raise ValueError(
            f"{type(model).__name__} has neither kv_cache_spec() nor RadixAttention / RadixLinearAttention layers"
        )
    cached = [a for a in attention if a.attn_type is not AttentionType.ENCODER_ONLY]
    geometry = {(a.tp_k_head_num, a.qk_head_dim, a.v_head_dim) for a in attention}
    if len(geometry) > 1:
        raise ValueError(
            f"{type(model).__name__}: attention layers differ in (kv heads, head dim, v head dim): "
            f"{sorted(geometry)}; give the model a kv_cache_spec()"
        )
    num_kv_heads, head_dim, v_head_dim = geometry.pop() if geometry else (1, 1, 1)
    gdn_geometry = {}
    if gdn:
        first = gdn[0]
        gdn_geometry = dict(
            gdn_layer_ids=tuple(m.layer_id for m in gdn),
            conv_dim=first.conv_dim,
            conv_kernel_size=first.conv_weight.shape[-1],
            num_k_heads=first.num_k_heads,
            num_v_heads=first.num_v_heads,
            head_k_dim=first.head_k_dim,
            head_v_dim=first.head_v_dim,
        )
    return KVCacheSpec(
        num_layers=1 + max(m.layer_id for m in [*attention, *gdn]),
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        full_attention_layer_ids=tuple(sorted(a.layer_id for a in cached)),
        **gdn_geometry,
    )


class ModelRunner:
    """Runs EXTEND steps (logits of each request's last new token) and DECODE steps (logits of every token)."""

    def __init__(
        self,
        model: nn.Module,
        spec: KVCacheSpec,
        config: EngineConfig,
        attn_backend: AttentionBackend,
        compile: bool = True,
        cuda_graphs: bool | None = None,
        extend_graph_max_tokens: int | None = None,
    ):
        self.model, self.spec, self.config, self.compile = model, spec, config, compile
        self.attn_backend, self.device = attn_backend, config.device
        device = config.device
        dtype = next(model.parameters()).dtype
        # one request row per running request; row 0 is the pool's padding row
        self.req_to_token_pool = ReqToTokenPool(config.max_batch_size + 1, config.max_context_len, device)
        self.kv_pool = None
        if spec.needs_kv_cache:
            self.kv_pool = KVPool(
                config.num_kv_pages,
                config.page_size,
                spec.num_layers,
                spec.num_kv_heads,
                spec.head_dim,
                dtype,
                device,
                v_head_dim=spec.v_head_dim,
                layer_ids=spec.full_attention_layer_ids,
            )
        self.gdn_pool = None
        if spec.gdn_layer_ids:
            self.gdn_pool = GDNPool(
                config.max_batch_size + 1,
                spec.num_gdn_layers,
                spec.conv_dim,
                spec.conv_kernel_size,
                spec.num_v_heads,
                spec.head_k_dim,
                spec.head_v_dim,
                dtype,
                device,
            )
        layers = [m for m in model.modules() if isinstance(m, RadixAttention)]
        attn_backend.init_model(layers, self.req_to_token_pool, self.kv_pool)
        self.builder = BatchBuilder(self.req_to_token_pool, self.kv_pool, attn_backend, self.gdn_pool, device)
        self._forward = compile_model(model, device) if compile else model
        self._encode = None
        self.decode_graphs: DecodeGraphs | None = None
        self.extend_graphs: ExtendGraphs | None = None
        decode, extend_tokens = capture_plan(
            cuda_graphs,
            extend_graph_max_tokens,
            device,
            compile,
            attn_backend,
            spec,
            config.max_tokens_per_step,
        )
        if decode:
            self.decode_graphs = DecodeGraphs(
                self._forward, self.builder, config.max_batch_size, capture=True
            )
            if extend_tokens:
                self.extend_graphs = ExtendGraphs(
                    self._forward, self.builder, config.max_batch_size, extend_tokens, capture=True
                )
            attn_backend.init_cuda_graph_state(
                config.max_batch_size, max(config.max_batch_size, extend_tokens)
            )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the (compiled) model on a built batch: float32 logits of its logits rows."""
        return self._forward(batch.input_ids, batch.positions, batch)

    def wrap_forward(self, wrapper: Callable[[Callable], Callable]) -> None:
        """Route every model call through `wrapper(forward)` (tensor parallelism: broadcast the step first)."""
        self._forward = wrapper(self._forward)

    @torch.inference_mode()
    def capture_cuda_graphs(self, progress: bool | None = None) -> None:
        """Capture the decode and extend graphs into one memory pool (no-op when CUDA graphs are off); call once,
        before serving. Both sets' graphs compile first (`gather_tuning`), so that the GEMV tuner's compiles for
        the first set's shapes run during the second's graph compile."""
        if self.decode_graphs is not None:
            sets = [graphs for graphs in (self.extend_graphs, self.decode_graphs) if graphs is not None]
            for graphs in sets:
                graphs.gather_tuning()
            pool = torch.cuda.graph_pool_handle()
            for graphs in sets:
                graphs.capture(progress, pool)

    @torch.inference_mode()
    def extend(self, requests: Sequence[RequestMemory], new_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append new_tokens[i] to requests[i]; float32 logits `[B, vocab]` of each request's last new token
        (replayed from a CUDA graph when the step fits one: then valid until the runner's next step)."""
        if self.extend_graphs is not None and self.extend_graphs.holds(new_tokens):
            return self.extend_graphs.run(requests, new_tokens)
        return self.forward(self.builder.extend(requests, new_tokens))

    @torch.inference_mode()
    def decode(self, requests: Sequence[RequestMemory], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append one token to each request; float32 logits `[B, vocab]` (from CUDA graphs: valid until the
        runner's next step). tokens: host ids, or the previous step's sampled tokens still on the device
        (overlapped scheduling)."""
        if self.decode_graphs is not None:
            return self.decode_graphs.run(requests, tokens)
        return self.forward(self.builder.decode(requests, tokens))

    @torch.inference_mode()
    def encode(self, prompts: Sequence[Sequence[int]], normalize: bool) -> torch.Tensor:
        """Pooled states `[B, hidden]` of whole prompts (an encoder model's `encode`), memory freed after."""
        if self._encode is None:
            encode = self.model.encode
            self._encode = compile_model(encode, self.device) if self.compile else encode
        requests = []
        try:
            for _ in prompts:
                requests.append(self.builder.new_request())
            batch = self.builder.extend(requests, prompts)
            return self._encode(batch.input_ids, batch.positions, batch, normalize=normalize)
        finally:
            for request in requests:
                self.builder.release(request)


def build_runner(
    model: nn.Module,
    *,
    backend: str = "auto",
    compile: bool = True,
    page_size: int = 16,
    max_batch_size: int | None = None,
    max_tokens_per_step: int | None = None,
    max_context_len: int | None = None,
    kv_memory_bytes: int | None = None,
    gpu_memory_utilization: float | None = None,
    cuda_graphs: bool | None = None,
    extend_graph_max_tokens: int | None = None,
) -> ModelRunner:
    """An engine for `model` on the device its weights are on: its cache spec, the limits (defaults from the
    device), the attention backend for that device, the pools and the (compiled) model."""
    parameter = next(model.parameters())
    device = parameter.device
    spec = model_cache_spec(model)
    attn_backend = choose_backend(backend, device, spec)
    max_tokens = max_tokens_per_step or EngineConfig.default_max_tokens_per_step(device)
    decode, extend_tokens = capture_plan(
        cuda_graphs, extend_graph_max_tokens, device, compile, attn_backend, spec, max_tokens
    )
    batch_size = max_batch_size or EngineConfig.default_max_batch_size(device)
    config = EngineConfig.resolve(
        device,
        spec,
        parameter.dtype,
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
        page_size=page_size,
        max_batch_size=max_batch_size,
        max_tokens_per_step=max_tokens_per_step,
        max_context_len=max_context_len,
        kv_memory_bytes=kv_memory_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        activation_bytes=activation_bytes(model, max_tokens, batch_size),
        cuda_graph_bytes=cuda_graph_bytes(model, batch_size, extend_tokens) if decode else 0,
    )
    return ModelRunner(
        model,
        spec,
        config,
        attn_backend,
        compile=compile,
        cuda_graphs=cuda_graphs,
        extend_graph_max_tokens=extend_graph_max_tokens,
    )


def cuda_graphs_problem(device: torch.device, backend: AttentionBackend, spec: KVCacheSpec) -> str | None:
    """Why decode steps of a model of cache spec `spec` on `backend` and `device` cannot be captured (None: they
    can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; the model is on {device}"
    if spec.is_encoder_only:
        return "an encoder-only model has no decode step to capture"
    if not backend.supports_cuda_graphs():
        return f"the {backend.name} backend cannot be captured (its kernels size their work on the host)"
    return None


def _use_cuda_graphs(
    requested: bool | None, device: torch.device, compile: bool, backend: AttentionBackend, spec: KVCacheSpec
) -> bool:
    """Whether decode runs from captured graphs: by default on CUDA with a compiled model and a capturable backend;
    asked for explicitly where it cannot work, a ValueError says why."""
    problem = cuda_graphs_problem(device, backend, spec)
    if requested is None:
        return problem is None and compile
    if requested and problem:
        raise ValueError(f"cuda_graphs=True: {problem}")
    return requested


def capture_plan(
    cuda_graphs: bool | None,
    extend_graph_max_tokens: int | None,
    device: torch.device,
    compile: bool,
    backend: AttentionBackend,
    spec: KVCacheSpec,
    max_tokens_per_step: int,
) -> tuple[bool, int]:
    """(whether decode steps are captured, the longest extend step captured or 0), from the requests and what the
    device, backend and model allow. Extend steps: by default up to DEFAULT_EXTEND_GRAPH_MAX_TOKENS where the
    backend can capture them, never past max_tokens_per_step. Asked for where it cannot work, a ValueError says
    why."""
    if extend_graph_max_tokens is not None and extend_graph_max_tokens < 0:
        raise ValueError(f"extend_graph_max_tokens must be >= 0, got {extend_graph_max_tokens}")
    if not _use_cuda_graphs(cuda_graphs, device, compile, backend, spec):
        if extend_graph_max_tokens:
            raise ValueError(f"extend_graph_max_tokens={extend_graph_max_tokens}: CUDA graphs are off")
        return False, 0
    if not backend.supports_cuda_graphs(ForwardMode.EXTEND):
        if extend_graph_max_tokens:
            raise ValueError(
                f"extend_graph_max_tokens={extend_graph_max_tokens}: the {backend.name} backend cannot capture "
                "extend steps"
            )
        return True, 0
    limit = DEFAULT_EXTEND_GRAPH_MAX_TOKENS if extend_graph_max_tokens is None else extend_graph_max_tokens
    return True, min(limit, max_tokens_per_step)


def _projection_widths(model: nn.Module) -> tuple[int, int]:
    """(the widest output of a projection below the LM head, the vocabulary): the widest 2-D weight is taken to be
    the LM head's (or the tied embedding's) and the next widest the body's; (0, 0) for a model without any."""
    widths = sorted({p.shape[0] for p in model.parameters() if p.dim() == 2})
    if not widths:
        return 0, 0
    return (widths[-2] if len(widths) > 1 else widths[-1]), widths[-1]


def activation_bytes(model: nn.Module, num_tokens: int, max_batch_size: int) -> int:
    """A generous estimate of one step's peak activations: a few live `[num_tokens, width]` float32 tensors at
    the widest projection below the LM head, and a few `[rows, vocab]` float32 ones for the logits and sampling,
    whose rows are one per request (`max_batch_size` at most), not one per token."""
    body, vocab = _projection_widths(model)
    logits_rows = min(num_tokens, max_batch_size)
    return 8 * num_tokens * body * 4 + 4 * logits_rows * vocab * 4


def cuda_graph_bytes(model: nn.Module, max_batch_size: int, extend_tokens: int) -> int:
    """A generous estimate of the memory capture takes: the graphs' one pool, holding the largest captured step's
    activations (a few live float32 rows per token at the widest projection below the LM head) and logits, and for
    each graph set (decode, extend) its logits buffer and its warm-up calls' logits, all `[max_batch_size, vocab]`
    float32. On an H200, llama-1b at 256 requests and 2048 extend tokens: 1.6 GiB estimated, 0.9 GiB measured."""
    body, vocab = _projection_widths(model)
    graph_sets = 2 if extend_tokens else 1
    logits = (1 + 2 * graph_sets) * max_batch_size * vocab * 4
    return 8 * max(max_batch_size, extend_tokens) * body * 4 + logits
