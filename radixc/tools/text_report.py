"""Terminal rendering of a radixc-inspect report: sections with headers, diffs coloured on a tty."""

from __future__ import annotations

from radixc.tools.graph_capture import CompiledGraph, InspectReport, Partitions, pass_diff

_ANSI = {"bold": "1", "red": "31", "green": "32", "cyan": "36"}
WIDTH = 100


class _Writer:
    """Collects lines; paints them with ANSI codes only when colour is on."""

    def __init__(self, color: bool):
        self.color, self.lines = color, []

    def paint(self, text: str, style: str) -> str:
        return f"\033[{_ANSI[style]}m{text}\033[0m" if self.color else text

    def line(self, text: str = "", style: str | None = None) -> None:
        self.lines.append(self.paint(text, style) if style else text)

    def header(self, title: str, rule: str) -> None:
        self.line()
        self.line(f"{rule * 3} {title} ".ljust(WIDTH, rule), "bold")

    def block(self, text: str, indent: str = "  ") -> None:
        self.lines.extend(indent + line for line in text.splitlines())

    def diff(self, lines: list[str]) -> None:
        styles = {"+": "green", "-": "red", "@": "cyan"}
        for line in lines:
            style = styles.get(line[:1])
            self.line("  " + line, style if not line.startswith(("+++", "---")) else "bold")


def format_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*row).rstrip() for row in rows
    ]


def kernel_rows(graph: CompiledGraph) -> list[list[str]]:
    return [[k.module, k.lowered_from or "?", k.kernel, k.call, k.node] for k in graph.kernels]


KERNEL_HEADERS = ["module", "generic op", "kernel", "call", "node"]
UNRECORDED_NOTE = "generic op '?': the pass that created the node did not set meta['radixc_lowered_from']"


def collective_summary(graph: CompiledGraph) -> str:
    """The graph's tensor-parallel collectives, e.g. 'all_reduce x9, all_gather_into_tensor x1'."""
    if not graph.collectives:
        return "none (one rank)"
    return ", ".join(f"{name} x{count}" for name, count in sorted(graph.collectives.items()))


def partition_summary(report: InspectReport, partitions: Partitions) -> list[str]:
    """What Inductor's graph partitioning would cut: no marks, or each cut and the partition sizes."""
    flags = (
        f"inductor graph_partition={'on' if report.graph_partition else 'off'}, "
        f"triton.cudagraphs={'on' if report.cudagraphs else 'off'}"
    )
    if not partitions.cuts:
        where = "" if report.has_partition_pass else " (radixc/passes/partition.py does not exist)"
        return [f"no partition marks{where}: the graph is one compute partition; {flags}"]
    lines = [f"{len(partitions.cuts)} node(s) run outside the compute partitions; {flags}"]
    lines += [f"  cut at {c.node}: {c.op} ({c.reason})" for c in partitions.cuts]
    sizes = ", ".join(str(size) for size in partitions.partition_sizes)
    lines.append(f"  {len(partitions.partition_sizes)} compute partition(s) of {sizes} node(s)")
    return lines


def render_graph(out: _Writer, report: InspectReport, graph: CompiledGraph, graphs: str) -> None:
    out.header(graph.label, "=")
    if not graph.records:
        out.line("no radixc ops in this graph: the radixc passes did not run")
    if graphs != "none":
        out.header(f"FX graph before radixc passes ({len(graph.input_graph.splitlines())} lines)", "-")
        out.block(graph.input_graph)
    for record in graph.records:
        diff = pass_diff(record)
        status = f"{record.rewrites} rewrite(s)" if diff else f"{record.rewrites} rewrites, graph unchanged"
        out.header(f"pass {record.pass_name}: {status}", "-")
        out.diff(diff)
        if graphs == "all" and diff:
            out.header(f"FX graph after {record.pass_name}", "-")
            out.block(record.after)
    if graphs == "ends" and graph.records:
        out.header("FX graph after radixc passes", "-")
        out.block(graph.final_graph)
    out.header("kernels (post-pass graph)", "-")
    if graph.kernels:
        out.lines.extend("  " + row for row in format_table(KERNEL_HEADERS, kernel_rows(graph)))
        if any(k.lowered_from is None for k in graph.kernels):
            out.line(f"  {UNRECORDED_NOTE}")
    else:
        out.line("  no radixc op calls")
    out.header("collectives (post-pass graph)", "-")
    out.line(f"  {collective_summary(graph)}")
    out.header("partitions", "-")
    out.lines.extend("  " + line for line in partition_summary(report, graph.partitions))
    if graph.inductor_partitions:
        out.line(f"  Inductor output code defines {graph.inductor_partitions} partition function(s)")
    out.header("Inductor output code", "-")
    if graph.output_path is None:
        out.line("  not captured")
        return
    calls = graph.radixc_code_lines()
    out.line(f"  {graph.output_path} ({len(graph.output_code.splitlines())} lines), radixc kernel calls:")
    for number, line in calls:
        out.line(f"  {number:>5}: {line}")
    if not calls:
        out.line("  none")


def render_summary(out: _Writer, report: InspectReport) -> None:
    out.header("summary", "=")
    for graph in report.graphs:
        counts = " ".join(f"{r.pass_name}={r.rewrites}" for r in graph.records) or "no radixc passes ran"
        out.line(f"pass rewrites, {graph.label}: {counts}")
    breaks = sum(report.graph_breaks.values())
    out.line(f"graph breaks: {breaks}", "red" if breaks else None)
    for reason, count in report.graph_breaks.items():
        out.line(f"  {count}x {reason}")
    modes = len({step.mode for step in report.steps})
    out.line(
        f"graphs compiled: {report.unique_graphs}; recompiles: {len(report.recompile_reasons)} "
        f"(expected {modes - 1}: one graph per forward mode)"
    )
    for reason in report.recompile_reasons:
        out.line(f"  recompiled because: {reason.splitlines()[0]}")
    out.line(f"CUDA graphs: {report.decode_graphs}")
    shape = report.shape_recompiles
    message = f"recompiles on a new batch size: {shape}" + (
        " (a bug: batch dims must stay dynamic)" if shape else ""
    )
    out.line(message, "red" if shape else None)
    for step in report.steps:
        verb = (
            f"compiled {step.graphs_compiled} graph(s)"
            if step.graphs_compiled
            else "reused the compiled graph"
        )
        out.line(f"  {step.mode} batch of {step.batch_size}: {verb} ({step.seconds:.1f} s)")


def render_text(report: InspectReport, color: bool = False, graphs: str = "ends") -> str:
    """The whole report as terminal text; graphs: 'all' (after every pass), 'ends' (input and final), 'none'."""
    out = _Writer(color)
    out.line(
        f"radixc-inspect: {report.model} ({report.architecture}), backend {report.backend}, "
        f"{report.dtype} on {report.device}",
        "bold",
    )
    for graph in report.graphs:
        render_graph(out, report, graph, graphs)
    render_summary(out, report)
    return "\n".join(out.lines) + "\n"
