"""The step as an FX graph (``Report.graph()``) and the ops at the peak (``Report.by_op()``, ``--by-op``):
the graph is the traced step op for op, its annotations add up to the report's timeline, and the per-op
table adds up to the peak."""

from __future__ import annotations

import json
import operator

import pytest
import torch

import memtrace
from memtrace.cli import main
from tiny_models import make_mlp, tiny_gpt2, token_batch

CUDA = {"device": "cuda", "gpu": "H100"}


def _op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


@pytest.mark.parametrize("make, kw", [
    (make_mlp, dict(input_shape=(3, 4), optimizer="adam", **CUDA)),
    (make_mlp, dict(input_shape=(3, 4), optimizer="sgd", device="cpu", steps=3)),
    (tiny_gpt2, dict(inputs=token_batch(), optimizer="adamw", amp="bf16", **CUDA)),
], ids=["mlp-cuda", "mlp-cpu", "gpt2-bf16"])
def test_graph_is_the_step_and_adds_up_to_the_timeline(make, kw):
    report = memtrace.report(make(), **kw)
    gm = report.graph()
    assert isinstance(gm, torch.fx.GraphModule) and "def forward" in gm.code
    gm.graph.lint()  # a well-formed graph: inputs first, every argument defined before its use
    nodes = _op_nodes(gm)
    assert len(nodes) == report.traced_ops  # every op the tracer saw, once
    assert [n.meta["memtrace"]["op_index"] for n in nodes] == list(range(1, report.traced_ops + 1))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    spans = [n.meta["memtrace"] for n in nodes] + [output.meta["memtrace"]]
    live = 0
    for info in spans:
        live += info["allocated_bytes"] - info["freed_bytes"]
        assert info["live_bytes"] == live
    assert live == report.timeline.allocated_bytes[-1]
    assert max(info["peak_bytes"] for info in spans) == report.peak_bytes
    made = [i for info in spans for i in info["allocations"]]
    assert sorted(made) == sorted(a.index for a in report.allocations)  # each device allocation, once
    assert {n.meta["memtrace"]["phase"] for n in nodes} >= {"setup", "forward", "backward", "optimizer"}


def test_graph_nodes_name_their_module_and_inputs():
    report = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", **CUDA)
    nodes = _op_nodes(report.graph())
    addmm = [n for n in nodes if n.target is torch.ops.aten.addmm.default]
    assert [n.meta["memtrace"]["module"] for n in addmm if n.meta["memtrace"]["phase"] == "forward"][:2] == ["0", "2"]
    first = addmm[0]
    # bias, input, transposed weight: the transpose is the node before, the bias a parameter made in setup
    assert first.args[2].target is torch.ops.aten.t.default
    assert first.args[0].meta["memtrace"]["phase"] == "setup"
    # the cuBLAS workspace is the matmul's, made inside it
    workspace = next(a for a in report.allocations if a.op.startswith("cuBLAS workspace"))
    assert workspace.index in first.meta["memtrace"]["allocations"]


def test_by_op_adds_up_to_the_peak():
    report = memtrace.report(tiny_gpt2(), inputs=token_batch(), optimizer="adamw", **CUDA)
    rows = report.by_op()
    assert sum(r.bytes for r in rows) == report.peak_bytes
    assert [r.bytes for r in rows] == sorted((r.bytes for r in rows), reverse=True)
    by_category = {}
    for r in rows:
        by_category[r.category] = by_category.get(r.category, 0) + r.bytes
    assert by_category == {c: n for c, n in report.by_category.items() if n}
    assert any(r.module == "(optimizer)" for r in rows)  # ops no module owns


def test_cli_by_op(capsys):
    model = ["examples/models.py:tiny_gpt", "--model-kwargs", '{"vocab": 50, "dim": 16, "layers": 1, "heads": 2}',
             "--seq-len", "8", "--batch-size", "2", "--no-levers"]
    assert main(model + ["--by-op", "3"]) == 0
    text = capsys.readouterr().out
    assert "Op at the peak" in text and "more)" in text
    assert main(model + ["--by-op", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(r["bytes"] for r in out["by_op"]) == out["peak_bytes"]


def test_graph_needs_the_step():
    report = memtrace.max_batch_size(make_mlp(), (1, 4), limit="200 MiB", optimizer="sgd", **CUDA).report
    with pytest.raises(ValueError, match="cannot trace its step again"):
        report.graph()
