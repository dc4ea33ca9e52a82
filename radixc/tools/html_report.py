"""One self-contained HTML page of a radixc-inspect report: a collapsible section per graph, pass diff,
kernel table and output code; inline CSS only, no external assets."""

from __future__ import annotations

from html import escape

from radixc.tools.graph_capture import CompiledGraph, InspectReport, pass_diff
from radixc.tools.text_report import (
    KERNEL_HEADERS,
    UNRECORDED_NOTE,
    collective_summary,
    kernel_rows,
    partition_summary,
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #1d1d1f; }
details { margin: 0.4em 0 0.4em 1em; }
details > summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 12px; line-height: 1.35; }
table { border-collapse: collapse; margin: 0.5em 0 0.5em 1em; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; font-family: monospace; }
th { background: #eaeef2; }
.add { color: #116329; background: #dafbe1; }
.del { color: #82071e; background: #ffebe9; }
.hunk { color: #0550ae; }
.kernel { background: #fff8c5; display: block; }
.bad { color: #82071e; font-weight: 600; }
"""


def _details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{escape(summary)}</summary>\n{body}\n</details>"


def _pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def _diff(lines: list[str]) -> str:
    classes = {"+": "add", "-": "del", "@": "hunk"}
    spans = []
    for line in lines:
        cls = None if line.startswith(("+++", "---")) else classes.get(line[:1])
        spans.append(f'<span class="{cls}">{escape(line)}</span>' if cls else escape(line))
    return '<pre class="diff">' + "\n".join(spans) + "</pre>"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _output_code(graph: CompiledGraph) -> str:
    if graph.output_path is None:
        return "<p>Inductor output code was not captured.</p>"
    marked = {number for number, _ in graph.radixc_code_lines()}
    lines = [
        f'<span class="kernel">{escape(line)}</span>' if number in marked else escape(line)
        for number, line in enumerate(graph.output_code.splitlines(), start=1)
    ]
    calls = _pre("\n".join(f"{n:>5}: {line}" for n, line in graph.radixc_code_lines()) or "none")
    return (
        f"<p>Written to <code>{escape(graph.output_path)}</code>. Lines calling radixc kernels:</p>{calls}"
        + _details("full output code", "<pre>" + "\n".join(lines) + "</pre>")
    )


def _graph_section(report: InspectReport, graph: CompiledGraph) -> str:
    parts = [_details("FX graph before radixc passes", _pre(graph.input_graph))]
    for record in graph.records:
        diff = pass_diff(record)
        changed = f"{record.rewrites} rewrite(s)" if diff else f"{record.rewrites} rewrites, graph unchanged"
        body = (_diff(diff) if diff else "<p>No change.</p>") + _details(
            f"FX graph after {record.pass_name}", _pre(record.after)
        )
        parts.append(_details(f"pass {record.pass_name}: {changed} (diff)", body, open_=bool(diff)))
    kernels = _table(KERNEL_HEADERS, kernel_rows(graph)) if graph.kernels else "<p>No radixc op calls.</p>"
    if any(k.lowered_from is None for k in graph.kernels):
        kernels += f"<p>{escape(UNRECORDED_NOTE)}</p>"
    parts.append(_details("kernels (post-pass graph)", kernels, open_=True))
    parts.append(_details("collectives (post-pass graph)", _pre(collective_summary(graph)), open_=True))
    partitions = partition_summary(report, graph.partitions)
    if graph.inductor_partitions:
        partitions.append(f"Inductor output code defines {graph.inductor_partitions} partition function(s)")
    parts.append(_details("partitions", _pre("\n".join(partitions)), open_=True))
    parts.append(_details("Inductor output code", _output_code(graph)))
    return _details(graph.label, "\n".join(parts), open_=True)


def _summary(report: InspectReport) -> str:
    rows = [
        ["model", f"{report.model} ({report.architecture})"],
        ["backend", report.backend],
        ["dtype / device", f"{report.dtype} / {report.device}"],
        ["graph breaks", str(sum(report.graph_breaks.values()))],
        ["graphs compiled", str(report.unique_graphs)],
        ["recompiles", str(len(report.recompile_reasons))],
        ["recompiles on a new batch size", str(report.shape_recompiles)],
        ["CUDA graphs", report.decode_graphs],
    ]
    rows += [
        [f"{s.mode} batch of {s.batch_size}", f"{s.graphs_compiled} graph(s) compiled, {s.seconds:.1f} s"]
        for s in report.steps
    ]
    rows += [
        [f"pass rewrites, {g.label}", " ".join(f"{r.pass_name}={r.rewrites}" for r in g.records)]
        for g in report.graphs
    ]
    breaks = "".join(f"<li>{count}x {escape(reason)}</li>" for reason, count in report.graph_breaks.items())
    reasons = "\n\n".join(report.recompile_reasons)
    return (
        _table(["", ""], rows)
        + (f'<ul class="bad">{breaks}</ul>' if breaks else "")
        + (_details("recompile reasons (Dynamo guard failures)", _pre(reasons)) if reasons else "")
    )


def render_html(report: InspectReport) -> str:
    """The report as one HTML page."""
    title = f"radixc-inspect: {report.model}"
    graphs = "\n".join(_graph_section(report, graph) for graph in report.graphs)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n"
        f"{_details('summary', _summary(report), open_=True)}\n{graphs}\n</body></html>\n"
    )
