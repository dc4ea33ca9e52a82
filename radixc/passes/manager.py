"""The radixc pass manager, installed as Inductor's post-grad custom pass when radixc is imported."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from radixc.passes.base import RadixPass
from radixc.passes.defunctionalize import Defunctionalize
from radixc.passes.fuse_gdn_decode import FuseGDNDecode
from radixc.passes.fuse_input_gate_linear import FuseInputGateLinear
from radixc.passes.fuse_linear_cast import FuseLinearCast
from radixc.passes.fuse_linear_rope_store_kv import FuseLinearRopeStoreKV
from radixc.passes.fuse_qk_norm_rope import FuseQKNormRope
from radixc.passes.fuse_rms_norm_linear import FuseRMSNormLinear
from radixc.passes.fuse_rope_kv_store import FuseRopeKVStore
from radixc.passes.fuse_silu_mul_linear import FuseSiluMulLinear
from radixc.passes.fusion_choices import UnbackedSizeFusionChoices, install_fusion_choices
from radixc.passes.graph_utils import radixc_nodes
from radixc.passes.lower import LowerRadixOps
from radixc.passes.lower_linear import LowerSmallBatchLinear
from radixc.passes.partition import MarkCudagraphPartitions

logger = logging.getLogger("radixc.passes")


@dataclasses.dataclass
class PassConfig:
    """Switches of the optional fusions and lowerings; defunctionalization and lowering of the radixc ops always
    run. `fuse_gdn_conv` makes lowering pick the conv1d kernel that also applies SiLU; `small_batch_linear` runs
    the linear layers of CUDA decode graphs through the Triton GEMV op, `fuse_silu_mul_linear` folds a gated
    MLP's SiLU-and-multiply into its gate-up GEMV there, `fuse_rms_norm_linear` the residual add before each
    RMSNorm into the GEMV before it and the norm into the GEMV after it. `fuse_linear_rope_store_kv` puts
    RoPE and the KV-cache store into the qkv GEMV's epilogue, `fuse_linear_cast` the LM head's float32 cast into
    its GEMV, `fuse_input_gate_linear` a gated attention's sigmoid output gate into its o_proj GEMV's prologue;
    `fuse_gdn_decode` makes a GDN layer's decode step
    (conv, delta rule and the gated RMSNorm after them) one kernel (off by default until timed on a GPU)."""

    fuse_rope_kv_store: bool = True
    fuse_qk_norm_rope: bool = True
    fuse_gdn_conv: bool = True
    small_batch_linear: bool = True
    fuse_silu_mul_linear: bool = True
    fuse_rms_norm_linear: bool = True
    fuse_linear_rope_store_kv: bool = True
    fuse_linear_cast: bool = True
    fuse_input_gate_linear: bool = True
    # off until timed on a GPU: the kernel has run under the Triton interpreter only
    fuse_gdn_decode: bool = False


config = PassConfig()


def set_switches(spec: str) -> None:
    """Set pass switches from `name=0|1[,name=0|1...]` (a benchmark's `--passes`), e.g.
    `fuse_rms_norm_linear=0`; an unknown name or value is an error naming it."""
    names = [field.name for field in dataclasses.fields(PassConfig)]
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name not in names or value not in ("0", "1"):
            raise ValueError(f"pass switch {item!r}: expected name=0|1 with name one of {', '.join(names)}")
        setattr(config, name, value == "1")


# (switch name, pass factory) in the order they run: the functional q/k-norm fusion (a pattern), the in-place form
# of the radixc ops, the rope + KV-store fusion on it, decode linear layers to the GEMV op (it reads the forward
# mode of the generic ops, so before lowering), the gated activation, the RMSNorm, a widening cast and an input
# gate into it, lowering to each node's kernels, the qkv GEMV and the Triton rope + store kernel after it into one, a GDN
# layer's decode kernels and its gated norm into one, partition marks.
_PIPELINE: list[tuple[str | None, Callable[[], RadixPass]]] = [
    ("fuse_qk_norm_rope", FuseQKNormRope),
    (None, Defunctionalize),
    ("fuse_rope_kv_store", FuseRopeKVStore),
    ("small_batch_linear", LowerSmallBatchLinear),
    ("fuse_silu_mul_linear", FuseSiluMulLinear),
    ("fuse_rms_norm_linear", FuseRMSNormLinear),
    ("fuse_linear_cast", FuseLinearCast),
    ("fuse_input_gate_linear", FuseInputGateLinear),
    (None, lambda: LowerRadixOps(fuse_gdn_conv=config.fuse_gdn_conv)),
    ("fuse_linear_rope_store_kv", FuseLinearRopeStoreKV),
    ("fuse_gdn_decode", FuseGDNDecode),
    (None, MarkCudagraphPartitions),
]


@dataclasses.dataclass
class PassRecord:
    """A graph as one pass found it and left it (kept only while a recorder is attached, e.g. radixc-inspect)."""

    pass_name: str
    rewrites: int
    before: str
    after: str


class RadixPassManager(CustomGraphPass):
    """Runs the enabled passes of the pipeline, then any pass the user had installed before radixc."""

    def __init__(self, chained: Callable | None = None):
        self.chained = chained
        self.last_counts: dict[str, int] = {}
        self.history: list[dict[str, int]] = []
        self.recorder: list[list[PassRecord]] | None = None

    def passes(self) -> list[RadixPass]:
        return [make() for switch, make in _PIPELINE if switch is None or getattr(config, switch)]

    def __call__(self, graph: torch.fx.Graph) -> None:
        if radixc_nodes(graph):
            records = []
            for radix_pass in self.passes():
                before = str(graph) if self.recorder is not None else ""
                count = radix_pass(graph)
                records.append(PassRecord(radix_pass.name, count, before, str(graph) if before else ""))
            self.last_counts = {r.pass_name: r.rewrites for r in records}
            self.history.append(self.last_counts)
            if self.recorder is not None:
                self.recorder.append(records)
            logger.info("radixc passes: %s", self.last_counts)
        if self.chained is not None:
            self.chained(graph)

    def uuid(self) -> str:
        parts = [p.uuid() for p in self.passes()]
        parts.append(repr(dataclasses.asdict(config)))
        # torch 2.11's cache key names the choices class only, not its code
        parts.append(UnbackedSizeFusionChoices().uuid())
        parts.append(hashlib.sha256(open(__file__, "rb").read()).hexdigest())
        if self.chained is not None:
            chained_uuid = getattr(self.chained, "uuid", None)
            parts.append(str(chained_uuid() if callable(chained_uuid) else None))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def install() -> RadixPassManager:
    """Install the pass manager into Inductor (idempotent), chaining a pass the user set before, and the fusion
    choices that count unbacked sizes (unless the user set choices of their own)."""
    if not install_fusion_choices():
        logger.warning(
            "Inductor's choices class is set (%s): RMSNorm and other reductions over the token dim stay "
            "unfused from their epilogues",
            inductor_config.inductor_choices_class,
        )
    current = inductor_config.post_grad_custom_post_pass
    if isinstance(current, RadixPassManager):
        return current
    manager = RadixPassManager(chained=current)
    inductor_config.post_grad_custom_post_pass = manager
    return manager
