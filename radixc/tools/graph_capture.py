"""Capture what torch.compile makes of a radixc model: the graph around each radixc pass, the kernel each
radixc op lowered to, where Inductor would cut graph partitions, and Inductor's output code."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import importlib.util
import logging
import operator
import re
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
import torch._inductor.config as inductor_config
import torch._inductor.utils as inductor_utils
from torch._inductor.graph import GraphLowering

from radixc.passes.graph_utils import AUTO_FUNCTIONALIZED, called_op, radixc_nodes
from radixc.passes.manager import PassRecord, RadixPassManager

logger = logging.getLogger("radixc.tools")

# the cudagraph_unsafe tag and the FX-node check appeared in recent torch versions; older ones have neither
_CUDAGRAPH_UNSAFE_TAG = getattr(torch.Tag, "cudagraph_unsafe", None)
_is_cudagraph_unsafe_fx_node = getattr(inductor_utils, "is_cudagraph_unsafe_fx_node", None)

_RADIXC_OP_CALL = re.compile(r"torch\.ops\.radixc\.\w+\.\w+\(")
_KERNEL_LAUNCH = re.compile(r"\w+\.run\(")
_SOURCE_COMMENT = re.compile(r"#.*Original ATen: \[(.*)\]")
_PARTITION_DEF = re.compile(r"^def partition_\d+\(", re.MULTILINE)
_NUM_USERS = re.compile(r" : \[num_users=\d+\]")


@dataclasses.dataclass
class KernelCall:
    """One radixc op call of a post-pass graph: the kernel op it runs and the generic op it was lowered from."""

    node: str
    module: str  # e.g. "model.layers.2.self_attn.attn"
    kernel: str  # e.g. "radixc.native_paged_attention"
    lowered_from: str | None  # e.g. "radixc.attention"; None when no pass lowered the node
    call: str  # "auto_functionalized_v2", "auto_functionalized" or "direct"


@dataclasses.dataclass
class PartitionCut:
    """A node Inductor runs outside the compute partitions (it is not CUDA-graphable), and why."""

    node: str
    op: str
    reason: str


@dataclasses.dataclass
class Partitions:
    """Partition boundaries of a post-pass graph: the cut nodes and the size of each compute partition."""

    cuts: list[PartitionCut]
    partition_sizes: list[int]  # call nodes (getitems excluded) in each compute partition, in graph order


@dataclasses.dataclass
class CompiledGraph:
    """One graph Inductor compiled: the pass records, kernels, partitions and output code."""

    label: str
    records: list[PassRecord]
    final_graph: str
    kernels: list[KernelCall]
    partitions: Partitions
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)
    output_path: str | None = None
    output_code: str = ""

    @property
    def input_graph(self) -> str:
        """The graph as the first radixc pass found it (the final graph when no radixc pass ran)."""
        return self.records[0].before if self.records else self.final_graph

    def radixc_code_lines(self) -> list[tuple[int, str]]:
        """(line number, line) of each output-code line that calls a radixc kernel."""
        return radixc_kernel_lines(self.output_code)

    @property
    def inductor_partitions(self) -> int:
        """Partition functions Inductor generated in the output code (0 when it did not partition)."""
        return len(_PARTITION_DEF.findall(self.output_code))


@dataclasses.dataclass
class Step:
    """One forward call the tool ran and how many graphs it compiled."""

    mode: str
    batch_size: int
    seconds: float
    graphs_compiled: int
    checks_new_batch_size: bool  # a second batch of a mode: compiling here is a recompile on a new shape


@dataclasses.dataclass
class InspectReport:
    """Everything radixc-inspect shows for one model."""

    model: str
    architecture: str
    backend: str
    dtype: str
    device: str
    steps: list[Step]
    graphs: list[CompiledGraph]
    graph_breaks: dict[str, int]
    unique_graphs: int
    recompile_reasons: list[str]
    has_partition_pass: bool
    graph_partition: bool
    cudagraphs: bool
    decode_graphs: str

    @property
    def shape_recompiles(self) -> int:
        """Graphs compiled for a second batch of an already compiled mode (DESIGN: that is a bug)."""
        return sum(s.graphs_compiled for s in self.steps if s.checks_new_batch_size)


def pass_diff(record: PassRecord, context: int = 3) -> list[str]:
    """Unified diff of the graph before and after one pass (empty when it changed nothing); use counts are
    left out, so that a rewrite shows as the nodes it changed, not as every input whose users changed."""
    return list(
        difflib.unified_diff(
            _NUM_USERS.sub("", record.before).splitlines(),
            _NUM_USERS.sub("", record.after).splitlines(),
            fromfile=f"before {record.pass_name}",
            tofile=f"after {record.pass_name}",
            lineterm="",
            n=context,
        )
    )


def radixc_kernel_lines(code: str) -> list[tuple[int, str]]:
    """Lines of Inductor output code that call a radixc op, or launch a kernel Inductor made from one."""
    found, source_ops = [], ""
    for number, line in enumerate(code.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            source = _SOURCE_COMMENT.search(stripped)
            source_ops = source.group(1) if source else source_ops
            continue
        if "assert_size_stride" in stripped:
            continue
        if _RADIXC_OP_CALL.search(stripped) or ("radixc." in source_ops and _KERNEL_LAUNCH.search(stripped)):
            found.append((number, stripped))
    return found


def module_path(node: torch.fx.Node) -> str:
    """The module that called the op; for a node a pass created, that of its nearest user that has one."""
    frontier, seen = collections.deque([node]), {node}
    while frontier:
        current = frontier.popleft()
        stack = current.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            return path.removeprefix("L['self']").removeprefix(".") or "<root>"
        for user in current.users:
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return "?"


def kernel_calls(graph: torch.fx.Graph) -> list[KernelCall]:
    """The radixc op calls of a post-pass graph, in graph order."""
    calls = []
    for node in radixc_nodes(graph):
        op = called_op(node)
        call = node.target.__name__ if node.target in AUTO_FUNCTIONALIZED else "direct"
        calls.append(
            KernelCall(
                node.name,
                module_path(node),
                f"{op.namespace}.{op._opname}",
                node.meta.get("radixc_lowered_from"),
                call,
            )
        )
    return calls


def collective_counts(graph: torch.fx.Graph) -> dict[str, int]:
    """How many of each tensor-parallel collective (`_c10d_functional` all_reduce, all_gather_into_tensor, ...;
    their waits left out) a post-pass graph calls, by op name."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        op = node.target
        if isinstance(op, torch._ops.OpOverload) and op.namespace == "_c10d_functional":
            if op._opname != "wait_tensor":
                counts[op._opname] = counts.get(op._opname, 0) + 1
    return counts


def partition_reason(node: torch.fx.Node) -> str | None:
    """Why Inductor's graph partitioning would run this node outside the compute partitions, or None."""
    op = called_op(node)
    if op is None:
        return None
    mark = node.meta.get("radixc_partition")  # set by radixc's partition pass on the ops it cuts at
    if mark is not None:
        return f"radixc_partition={mark}"
    if _CUDAGRAPH_UNSAFE_TAG is not None and _CUDAGRAPH_UNSAFE_TAG in op.tags:
        return "op tagged cudagraph_unsafe"
    names = getattr(inductor_config, "custom_should_partition_ops", [])
    if names and any(name in names for name in inductor_utils.get_op_names(op)):  # matched as Inductor does
        return "op listed in inductor config custom_should_partition_ops"
    if node.target not in AUTO_FUNCTIONALIZED and _is_cudagraph_unsafe_fx_node is not None:
        if _is_cudagraph_unsafe_fx_node(node):
            return "CUDA-graph-unsafe op"
    return None


def find_partitions(graph: torch.fx.Graph) -> Partitions:
    """Cut the graph at every node Inductor would keep out of a CUDA-graphable partition."""
    cuts, sizes, current = [], [], 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        reason = partition_reason(node)
        if reason is None:
            current += 1
            continue
        cuts.append(PartitionCut(node.name, str(called_op(node)), reason))
        sizes.append(current)
        current = 0
    sizes.append(current)
    return Partitions(cuts, [size for size in sizes if size])


def has_partition_pass() -> bool:
    """Whether radixc has a partition pass (radixc/passes/partition.py) that may mark ops to cut at."""
    return importlib.util.find_spec("radixc.passes.partition") is not None


class GraphCapture:
    """Records every graph compiled while attached: hooks the pass manager and Inductor's codegen."""

    def __init__(self, manager: RadixPassManager):
        self.manager = manager
        self.graphs: list[CompiledGraph] = []
        self.label = ""  # what the caller is running now; names the graphs compiled meanwhile

    @contextlib.contextmanager
    def attached(self) -> Iterator[GraphCapture]:
        """Attach a recorder to the manager and run a hook after its passes; restore both on exit."""
        manager = self.manager
        saved_recorder, saved_chained = manager.recorder, manager.chained
        compile_to_module = GraphLowering.compile_to_module

        def after_radixc_passes(graph: torch.fx.Graph) -> None:
            self._record_graph(graph)
            if saved_chained is not None:
                saved_chained(graph)

        def capture_output_code(lowering: GraphLowering):
            module = compile_to_module(lowering)
            self._record_output_code(module.__file__)
            return module

        manager.recorder, manager.chained = [], after_radixc_passes
        try:
            with mock.patch.object(GraphLowering, "compile_to_module", capture_output_code):
                yield self
        finally:
            manager.recorder, manager.chained = saved_recorder, saved_chained

    def _record_graph(self, graph: torch.fx.Graph) -> None:
        # the manager appends a graph's records only when it held radixc ops, just before calling its chain
        records = self.manager.recorder.pop() if self.manager.recorder else []
        label = f"graph {len(self.graphs) + 1}" + (f": {self.label}" if self.label else "")
        self.graphs.append(
            CompiledGraph(
                label,
                records,
                str(graph),
                kernel_calls(graph),
                find_partitions(graph),
                collective_counts(graph),
            )
        )
        logger.info("captured %s: %d radixc op call(s)", label, len(self.graphs[-1].kernels))

    def _record_output_code(self, path: str | None) -> None:
        pending = [g for g in self.graphs if g.output_path is None]
        if not pending or path is None:
            logger.warning("Inductor output code %s matches no captured graph", path)
            return
        pending[-1].output_path = path
        pending[-1].output_code = Path(path).read_text()
        logger.info("output code of %s: %s", pending[-1].label, path)
