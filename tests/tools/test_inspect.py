"""radixc-inspect on a tiny hybrid preset (one decode compile for the whole module), plus its partition and
output-code helpers on hand-made inputs."""

from __future__ import annotations

import contextlib
import io
import re
import types

import pytest
import torch
import torch._inductor.config as inductor_config

import radixc
import radixc.tools.inspect as inspect_tool
from radixc.ops.library import resolve_kernel
from radixc.tools.graph_capture import Partitions, find_partitions, radixc_kernel_lines
from radixc.tools.inspect import main
from radixc.tools.text_report import partition_summary

MODEL = "tiny-qwen3.5"  # GDN layers 0, 1, 3 and full attention at layer 2
# the kernel the lowering registry names for native decode attention
ATTENTION_DECODE_KERNEL = f"radixc.{resolve_kernel('attention', 'native', 'decode')._opname}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of the tool in decode mode: (exit code, text output, HTML page)."""
    html = tmp_path_factory.mktemp("inspect") / "report.html"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["--model", MODEL, "--mode", "decode", "--device", "cpu", "--html", str(html)])
    yield code, stdout.getvalue(), html.read_text() if html.exists() else ""
    torch._dynamo.reset()


def section(text: str, title: str) -> str:
    """The body of the text section whose header starts with `--- title`."""
    start = text.index(f"--- {title}")
    end = text.find("\n--- ", start + 1)
    return text[start:end]


def kernel_rows(text: str) -> list[list[str]]:
    """[module, generic op, kernel, call, node] per row of the kernel table."""
    return [line.split() for line in section(text, "kernels").splitlines() if line.startswith("  model.")]


def kernel_op(name: str) -> torch._ops.OpOverload:
    """torch.ops.radixc.<op>.default for a name such as 'radixc.native_paged_attention'."""
    return getattr(torch.ops.radixc, name.removeprefix("radixc.")).default


def test_main_returns_zero_for_a_preset_in_decode_mode(run):
    code, text, _ = run
    assert code == 0
    assert text.startswith(f"radixc-inspect: {MODEL} (Qwen3_5ForCausalLM), backend native")
    assert "=== graph 1: decode, batch of 2 " in text


def test_text_names_every_radixc_pass_with_its_rewrite_count_and_a_diff(run):
    _, text, _ = run
    for radix_pass in radixc.passes.install().passes():
        assert re.search(rf"--- pass {radix_pass.name}: \d+ rewrite", text), radix_pass.name
    lowering = section(text, "pass lower_radixc_ops")
    assert "+++ after lower_radixc_ops" in lowering
    assert "radixc.attention.default" in lowering and "+    %native_" in lowering


def test_kernel_table_names_the_kernels_inductor_output_code_calls(run):
    _, text, _ = run
    path = re.search(r"^  (\S+\.py) \(\d+ lines\), radixc kernel calls:", text, re.MULTILINE).group(1)
    with open(path) as code:
        called = set(re.findall(r"torch\.ops\.radixc\.(\w+)\.default\(", code.read()))
    kernels = section(text, "kernels")
    assert ATTENTION_DECODE_KERNEL.removeprefix("radixc.") in called
    for name in called:
        assert f"radixc.{name} " in kernels, name
        assert name.startswith("native_"), f"generic op {name} left in the compiled code"
    # every GDN layer runs decode kernels, the attention layer the decode kernel radixc.attention lowers to
    rows = kernel_rows(text)
    for layer in (0, 1, 3):
        gdn_kernels = [row[2] for row in rows if row[0].startswith(f"model.layers.{layer}.linear_attn")]
        assert gdn_kernels and all(
            k.startswith("radixc.native_") and k.endswith("_decode") for k in gdn_kernels
        )
    assert ["radixc.attention", ATTENTION_DECODE_KERNEL] in [row[1:3] for row in rows]


def test_text_output_is_not_coloured_when_stdout_is_not_a_tty(run):
    _, text, _ = run
    assert "\033[" not in text


def test_summary_reports_no_graph_break_and_no_recompile_for_a_new_batch_size(run):
    _, text, _ = run
    summary = text[text.index("=== summary") :]
    assert "graph breaks: 0" in summary
    assert "graphs compiled: 1; recompiles: 0" in summary
    assert "recompiles on a new batch size: 0" in summary
    assert "decode batch of 3: reused the compiled graph" in summary


def test_partitions_section_cuts_at_each_kernel_tagged_cudagraph_unsafe(run):
    _, text, _ = run
    rows = kernel_rows(text)
    unsafe = [row for row in rows if torch.Tag.cudagraph_unsafe in kernel_op(row[2]).tags]
    partitions = section(text, "partitions")
    if not unsafe:
        assert "no partition marks" in partitions
    else:
        assert f"{len(unsafe)} node(s) run outside the compute partitions" in partitions
    for row in unsafe:
        assert f"cut at {row[4]}: {row[2]}.default" in partitions


def test_html_report_is_one_self_contained_page_with_collapsible_graphs_diffs_and_kernels(run):
    _, _, html = run
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count("<details") >= 6
    for summary in (
        "FX graph before radixc passes",
        "pass lower_radixc_ops",
        "kernels",
        "Inductor output code",
    ):
        assert f"<summary>{summary}" in html, summary
    assert '<span class="add">+    %native_' in html  # the lowering diff, coloured
    assert f"<td>radixc.attention</td><td>{ATTENTION_DECODE_KERNEL}</td>" in html
    assert not re.search(r"<(link|script|img)\b|\bsrc=|https?://", html)


def test_bad_model_name_exits_nonzero_with_a_clear_error(capsys):
    assert main(["--model", "no-such-model", "--mode", "decode"]) == 2
    err = capsys.readouterr().err
    assert (
        "radixc-inspect: error: model 'no-such-model' is neither a checkpoint directory nor a preset" in err
    )
    assert "tiny-qwen3.5" in err  # the presets it knows


def test_html_path_that_cannot_be_written_fails_before_compiling(tmp_path, monkeypatch, capsys):
    def compile_nothing(args):
        raise AssertionError("the model was compiled before the --html path was checked")

    monkeypatch.setattr(inspect_tool, "inspect_model", compile_nothing)
    missing = tmp_path / "missing" / "report.html"
    assert main(["--model", MODEL, "--html", str(missing)]) == 2
    assert (
        f"radixc-inspect: error: --html {missing}: folder {missing.parent} does not exist"
        in capsys.readouterr().err
    )
    assert main(["--model", MODEL, "--html", str(tmp_path)]) == 2
    assert f"--html {tmp_path}: is a folder; give a file name such as report.html" in capsys.readouterr().err


@pytest.fixture(scope="module")
def host_plan_op():
    """A custom op tagged cudagraph_unsafe, as a partition pass would mark host-side planning."""
    if getattr(torch.Tag, "cudagraph_unsafe", None) is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    lib = torch.library.Library("radixc_inspect_test", "FRAGMENT")
    lib.define("host_plan(Tensor x) -> Tensor", tags=(torch.Tag.cudagraph_unsafe,))
    lib.impl("host_plan", lambda x: x.clone(), "CompositeExplicitAutograd")
    yield torch.ops.radixc_inspect_test.host_plan.default
    lib._destroy()


def test_partitions_cut_at_cudagraph_unsafe_ops_and_at_ops_listed_in_inductor_config(host_plan_op):
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    added = graph.call_function(aten.add.Tensor, (x, x))
    planned = graph.call_function(host_plan_op, (added,))
    product = graph.call_function(aten.mul.Tensor, (planned, planned))
    relu = graph.call_function(aten.relu.default, (product,))
    graph.output(relu)

    partitions = find_partitions(graph)
    assert [(c.node, c.reason) for c in partitions.cuts] == [(planned.name, "op tagged cudagraph_unsafe")]
    assert partitions.partition_sizes == [1, 2]
    with inductor_config.patch(custom_should_partition_ops=["aten::relu"]):
        partitions = find_partitions(graph)
    assert [c.node for c in partitions.cuts] == [planned.name, relu.name]
    assert partitions.partition_sizes == [1, 1]


def test_partition_summary_says_no_partition_marks_when_radixc_has_no_partition_pass():
    report = types.SimpleNamespace(has_partition_pass=False, graph_partition=True, cudagraphs=False)
    (line,) = partition_summary(report, Partitions(cuts=[], partition_sizes=[12]))
    assert line.startswith("no partition marks (radixc/passes/partition.py does not exist)")


def test_kernel_lines_are_radixc_op_calls_and_launches_of_kernels_inductor_made_from_radixc_ops():
    code = "\n".join(
        [
            "def call(args):",
            "    # Topologically Sorted Source Nodes: [attn], Original ATen: [radixc.triton_decode_attention]",
            "    _decode_kernel_0.run(buf1, arg2_1, stream=stream0)",
            "    assert_size_stride(buf1, (s0, 4), (4, 1), 'torch.ops.radixc.native_gdn_decode.default')",
            "    buf2 = torch.ops.radixc.native_gdn_decode.default(buf1, arg3_1)",
            "    # Topologically Sorted Source Nodes: [add], Original ATen: [aten.add]",
            "    triton_poi_fused_add_1.run(buf2, buf3, stream=stream0)",
            "    # torch.ops.radixc.native_paged_attention.default(buf3) in a comment",
        ]
    )
    assert radixc_kernel_lines(code) == [
        (3, "_decode_kernel_0.run(buf1, arg2_1, stream=stream0)"),
        (5, "buf2 = torch.ops.radixc.native_gdn_decode.default(buf1, arg3_1)"),
    ]


def test_summary_says_whether_and_at_which_batch_sizes_decode_is_captured(run):
    _, text, html = run
    line = "CUDA graphs: not captured: CUDA graphs need a CUDA device; the model is on cpu"
    assert line in text
    assert "<td>CUDA graphs</td><td>not captured: CUDA graphs need a CUDA device" in html


def test_tensor_parallel_run_lists_the_collectives_and_each_all_reduce_feeds_a_fused_add_rms_norm():
    """Two gloo ranks of tiny-qwen3-next's decode graph: the embedding, every mixer's out/o_proj and every MoE
    block all-reduce, the logits are all-gathered; in Inductor's output each all-reduced buffer goes, right
    after its wait, into one fused kernel with the residual add and the next RMSNorm (no radixc pass needed)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["--model", "tiny-qwen3-next", "--mode", "decode", "--device", "cpu"]
            + ["--graphs", "none", "--tensor-parallel-size", "2"]
        )
    text = stdout.getvalue()
    assert code == 0
    layers = 4
    summary = f"all_gather_into_tensor x1, all_reduce x{1 + 2 * layers}"
    assert section(text, "collectives").splitlines()[1].strip() == summary
    code_path = re.search(r"  (/\S+\.py) \(\d+ lines\)", section(text, "Inductor output code")).group(1)
    lines = open(code_path).read().splitlines()
    waits = [i for i, line in enumerate(lines) if "_c10d_functional.wait_tensor.default(" in line]
    reduced = [re.search(r"all_reduce_\.default\((\w+),", line) for line in lines]
    reduced_buffers = {m.group(1) for m in reduced if m}
    assert len(reduced_buffers) == 1 + 2 * layers
    for i in waits:
        buffer = re.search(r"wait_tensor\.default\((\w+)\)", lines[i]).group(1)
        if buffer not in reduced_buffers:
            continue  # the logits' all-gather
        kernel = next(line for line in lines[i + 1 :] if re.match(r"\s+cpp_fused_\w+\(", line))
        assert "rsqrt" in kernel and re.search(rf"\b{buffer}\b", kernel), (lines[i], kernel)
