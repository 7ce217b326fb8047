"""Compiled steps (``compile=True``, ``torch.compile(model)``): the partitioner's saved set against PyTorch's
own partitioner, the whole step against the real compiled step on the CPU, graph breaks, and the errors."""

from __future__ import annotations

import contextlib
import copy
import shutil

import pytest
import torch
from torch import nn

import memtrace
from memtrace.options import Category, Phase

from memtrace.targets import TORCH_VERSION

pytestmark = pytest.mark.skipif(TORCH_VERSION < (2, 6), reason="compile= needs PyTorch 2.6 or later")

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="the real compiled step needs a C++ compiler")


class Chain(nn.Module):
    """Linear, a chain of pointwise ops, Linear: what Inductor fuses into one kernel."""

    def __init__(self, dim=32, hidden=128, graph_break=False):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.graph_break = graph_break

    def forward(self, x):
        h = self.up(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.down(torch.sin(h) * torch.cos(h) + torch.tanh(h) * 2)


def _real_compiled_peak(model, input_shape, optimizer="sgd", steps=2):
    from memtrace.measure import measure_compiled_cpu

    return measure_compiled_cpu(model, input_shape, optimizer=optimizer, steps=steps).peak_bytes


@needs_cxx
@pytest.mark.parametrize("graph_break", [False, True], ids=["one-graph", "graph-break"])
def test_compiled_step_is_the_real_compiled_step(graph_break):
    model = Chain(graph_break=graph_break)
    predicted = memtrace.report(model, (64, 32), optimizer="sgd", device="cpu", compile=True)
    assert predicted.peak_bytes == _real_compiled_peak(model, (64, 32))
    eager = memtrace.report(model, (64, 32), optimizer="sgd", device="cpu")
    if not graph_break:
        assert predicted.peak_bytes < eager.peak_bytes  # the chain's intermediates never exist
    assert predicted.settings["compile"] == {} and "Compiled step" in predicted.notes[-1]


def _partitioner_saved_bytes(model, x, budget=None) -> int:
    """The bytes of the new tensors Inductor's forward graph saves for backward, as PyTorch's partitioner
    (called by Inductor, with its settings) split the step: the forward graph's outputs after the model's
    own, less inputs and views of them."""
    from torch._inductor.compile_fx import compile_fx

    saved = []

    def record(gm, example_inputs, **kwargs):
        if not kwargs.get("is_backward", False) and not saved:
            out = next(n for n in gm.graph.nodes if n.op == "output")
            for node in out.args[0][1:]:  # the model's output first, then what backward needs
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor) or node.op == "placeholder":
                    continue
                schema = getattr(node.target, "_schema", None)
                if schema is not None and schema.returns and schema.returns[0].alias_info is not None:
                    continue  # a view: no allocation of its own
                saved.append(val.untyped_storage().nbytes())

        def run(args):
            return gm(*args)

        run._boxed_call = True
        return run

    patch = (torch._functorch.config.patch(activation_memory_budget=budget) if budget is not None
             else contextlib.nullcontext())
    from memtrace.compiled import _no_caches

    torch._dynamo.reset()
    with patch, _no_caches():
        torch.compile(copy.deepcopy(model), backend=lambda gm, ex: compile_fx(gm, ex, inner_compile=record))(x)
    torch._dynamo.reset()
    return sum(saved)


@pytest.mark.parametrize("budget", [None, 0.0], ids=["default", "budget-0"])
def test_saved_for_backward_is_the_partitioners(budget):
    model = Chain()
    compile = True if budget is None else {"activation_memory_budget": budget}
    r = memtrace.report(model, (64, 32), optimizer="sgd", device="cpu", compile=compile, steps=1)
    saved = sum(a.requested_bytes for a in r.allocations if a.category is Category.ACTIVATION
                and a.phase is Phase.FORWARD)
    assert saved == _partitioner_saved_bytes(model, torch.randn(64, 32), budget)


def test_budget_trades_memory_for_recomputation():
    model = Chain(hidden=512)
    default = memtrace.report(model, (256, 32), optimizer="sgd", device="cpu", compile=True)
    tight = memtrace.report(model, (256, 32), optimizer="sgd", device="cpu", compile={"activation_memory_budget": 0})
    assert tight.by_category[Category.ACTIVATION] < default.by_category[Category.ACTIVATION]


def test_a_compiled_model_is_predicted_compiled():
    model = Chain()
    given = memtrace.report(torch.compile(model), (16, 32), optimizer="sgd", device="cpu")
    asked = memtrace.report(model, (16, 32), optimizer="sgd", device="cpu", compile=True)
    assert given.peak_bytes == asked.peak_bytes and given.settings["compile"] == {}
    eager = memtrace.report(torch.compile(model), (16, 32), optimizer="sgd", device="cpu", compile=False)
    assert eager.peak_bytes == memtrace.report(model, (16, 32), optimizer="sgd", device="cpu").peak_bytes
    assert any("this report shows the eager step" in n for n in eager.notes)


def test_cuda_compiled_step_keeps_the_library_rules():
    r = memtrace.report(Chain(), (16, 32), optimizer="sgd", device="cuda", gpu="H100", compile=True)
    workspaces = [a.op for a in r.allocations if a.category is Category.WORKSPACE]
    assert "cuBLAS workspace (main thread)" in workspaces and "cuBLAS workspace (autograd thread)" in workspaces
    assert "Triton" in r.notes[-1]


def test_a_failing_compilation_is_an_error_not_an_eager_number(monkeypatch):
    import torch._inductor.compile_fx as inductor

    def broken(*args, **kwargs):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(inductor, "compile_fx", broken)
    with pytest.raises(memtrace.TraceError, match="could not compile"):
        memtrace.report(Chain(), (16, 32), optimizer="sgd", device="cpu", compile=True)


@pytest.mark.parametrize("kw, message", [
    (dict(compile={"mode": "reduce-overhead"}), "private memory pool"),
    (dict(compile={"activation_memory_budget": 2}), "from 0 to 1"),
    (dict(compile={"fullgraph": True}), "unknown key"),
    (dict(compile=True, checkpoint=["0"]), "not predicted yet"),
    (dict(compile=True, verify=True, device="cuda"), "on the CPU only"),
])
def test_compile_settings_refused(kw, message):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=message):
        memtrace.report(model, (4, 8), **{"device": "cpu", **kw})


@needs_cxx
def test_verify_measures_the_compiled_step_on_the_cpu():
    model = Chain()
    r = memtrace.report(model, (64, 32), optimizer="adam", device="cpu", verify=True,
                        compile={"activation_memory_budget": 0.0})
    assert r.measured is not None and r.measured.peak_bytes > 0
    assert abs(r.error_percent) < 0.01
    assert "Measured peak" in r.table()


def test_compile_in_levers_and_compare():
    model = Chain(hidden=512)
    base = memtrace.report(model, (256, 32), optimizer="sgd", device="cpu")
    result = memtrace.levers(model, (256, 32), limit=base.peak_bytes - 1024, optimizer="sgd", device="cpu",
                             compile_levers=True)
    by_label = {lv.label: lv for lv in result.levers}
    compiled = memtrace.report(model, (256, 32), optimizer="sgd", device="cpu", compile=True)
    assert by_label["torch.compile"].report.peak_bytes == compiled.peak_bytes < base.peak_bytes
    assert "torch.compile, activation memory budget 0.5" in by_label
    assert "torch.compile" not in {lv.label for lv in memtrace.levers(
        model, (256, 32), limit=base.peak_bytes - 1024, optimizer="sgd", device="cpu").levers}
    table = memtrace.compare(model, (256, 32), optimizer="sgd", device="cpu", variants=["fp32", "compile",
                                                                                     "compile-budget"])
    peaks = [row.report.peak_bytes for row in table.rows]
    assert peaks[0] == base.peak_bytes and peaks[1] == compiled.peak_bytes and peaks[2] <= peaks[1]
