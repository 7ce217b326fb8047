"""The pytest plugin, run in inner pytest sessions (``pytester``).

Byte counts are those of test_exact_bytes.py, on device="cpu" where every storage is charged its exact
size. The step of a bias-free Linear(4, 3) on x: (2, 4), loss = out.mean(), peaks in backward's mm at
weight 48 + x 32 + out 24 + loss 4 + ones 4 + grad_out 24 + weight.grad 48 = 184 B.
"""

from __future__ import annotations

import json

import pytest
import torch

import memtrace
from memtrace import format_bytes
from memtrace.gpus import lookup

pytest_plugins = ["pytester"]

LINEAR = """
import pytest, torch
from torch import nn

def linear():
    return nn.Linear(4, 3, bias=False)
"""

BODY = """
def step():
    m = linear()
    x = torch.randn(2, 4)
    out = m(x)
    loss = out.mean()
    loss.backward()
"""


@pytest.fixture(scope="module", autouse=True)
def _imports_outlive_inner_sessions():
    """pytester removes the modules an in-process inner session imported; torch registers operator
    libraries when some of its modules are first imported and refuses to register them twice, so the
    imports that tracing makes lazily are made here, before any inner session starts."""
    from memtrace.body import trace_callable
    from memtrace.options import Inputs, Options

    memtrace.report(torch.nn.Linear(2, 2), (1, 2))
    trace_callable(lambda: torch.nn.Linear(2, 2)(torch.randn(1, 2)).sum().backward(),
                   Options(inputs=Inputs(), optimizer=None, optimizer_name="none", device="cpu"))


# Inner sessions load only this plugin (pytester would re-import every installed plugin for each) and
# skip unraisableexception's gc.collect() at exit, which takes a second with torch loaded.
INNER = ("-p", "memtrace.pytest_plugin", "-p", "no:unraisableexception")


@pytest.fixture(autouse=True)
def _no_plugin_autoload(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def run(pytester, source: str, *args: str):
    pytester.makepyfile(test_budget=LINEAR + source)
    return pytester.runpytest(*INNER, *args)


def test_installed_as_a_pytest11_entry_point():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="pytest11") if e.name == "memtrace"]
    assert plugin.value == "memtrace.pytest_plugin"


# ---- the fixture --------------------------------------------------------------------------------

def test_budget_that_holds_passes_and_returns_the_report(pytester):
    result = run(pytester, """
def test_fits(memtrace_budget):
    r = memtrace_budget(linear(), (2, 4), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu",
                        limit="184 B")
    assert r.peak_bytes == 184
    assert r.layer("").param_bytes == 48
""")
    result.assert_outcomes(passed=1)


def _has_parallel() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_parallel(), reason="parallel= needs PyTorch 2.6 or later")
def test_budget_of_one_rank(pytester):
    result = run(pytester, """
def test_ranks(memtrace_budget):
    r = memtrace_budget(linear(), (2, 4), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu",
                        parallel={"ddp": 2}, limit="1 KiB")
    assert r.world_size == 2
""")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*Linear, rank 0 of 2 (DDP 2)*ok*"])


def test_budget_over_the_limit_fails_with_the_excess_and_a_breakdown(pytester):
    result = run(pytester, """
def test_too_big(memtrace_budget):
    memtrace_budget(linear(), (2, 4), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu", limit=183)
    raise AssertionError("not reached: the budget fails the test where it is called")
""")
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "Training step was limited to 183 B but is predicted to peak at 184 B (+1 B)",
        "*Captured memtrace call*",
        "Predicted peak: 184 B in iteration 0, backward, in the root module (aten.mm.default)",
        "parameters * 48 B *",
        "gradients * 48 B *",
        "Top layers by memory*",
        "Linear * Linear * 48 B * 48 B * 0 B * 0 B * 96 B",
    ])
    result.stdout.no_fnmatch_line("*not reached*")


def test_gpu_budget_is_the_cards_usable_memory(pytester):
    usable = lookup("A5000").usable_bytes()
    result = run(pytester, """
def test_on_a5000(memtrace_budget):
    r = memtrace_budget(linear(), (2, 4), gpu="A5000")
    assert r.settings["gpu"] == "A5000"
""", "--memtrace-json=out.json")
    result.assert_outcomes(passed=1)
    (entry,) = json.loads((pytester.path / "out.json").read_text())["results"]
    assert (entry["limit_bytes"], entry["limit_source"], entry["gpu"]) == (usable, "A5000 usable memory", "A5000")
    result.stdout.fnmatch_lines([f"test_budget.py::test_on_a5000 * Linear * {format_bytes(usable)} *"])


def test_gpu_budget_over_names_the_card(pytester):
    # Linear(2**16, 2**16) without bias: 2**32 floats = 16 GiB of weight, more than an A5000's 24 GiB holds
    # once its gradient joins it
    result = run(pytester, """
def test_huge(memtrace_budget):
    with torch.device("meta"):
        model = nn.Linear(2**16, 2**16, bias=False)
    memtrace_budget(model, (1, 2**16), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, gpu="A5000")
""")
    result.assert_outcomes(failed=1)
    usable = format_bytes(lookup("A5000").usable_bytes())
    result.stdout.fnmatch_lines([f"Training step was limited to {usable} (A5000 usable memory) but is predicted "
                                 "to peak at 32.* GiB (+*)"])


# Linear(n, n) without bias, SGD without momentum, on the CPU: the peak is the weight and its gradient
# (8 n^2 B) plus a few KiB. n = 45_000: 16.2e9 B, over 16 GB (16e9 B) and under 16 GiB (17.18e9 B).
DECIMAL_VS_BINARY = """
@pytest.mark.parametrize("limit", ["16 GiB", "16G", "16 GB", "16GB"])
def test_units(memtrace_budget, limit):
    with torch.device("meta"):
        model = nn.Linear(45_000, 45_000, bias=False)
    r = memtrace_budget(model, (1, 45_000), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu",
                        limit=limit)
    assert 16 * 10**9 < r.peak_bytes < 16 * 2**30
"""


def test_limits_in_gib_are_binary_and_in_gb_decimal(pytester):
    result = run(pytester, DECIMAL_VS_BINARY, "--memtrace-json=out.json")
    result.assert_outcomes(passed=2, failed=2)
    limits = {e["key"].split("[")[1].rstrip("]"): (e["limit_bytes"], e["passed"])
              for e in json.loads((pytester.path / "out.json").read_text())["results"]}
    assert limits == {"16 GiB": (16 * 2**30, True), "16G": (16 * 2**30, True),
                      "16 GB": (16 * 10**9, False), "16GB": (16 * 10**9, False)}
    # the decimal limit is shown in binary units, with what was written beside it
    result.stdout.fnmatch_lines(["Training step was limited to 14.9 GiB (16 GB) but is predicted to peak at 15.1 GiB*"])


def test_unreadable_limit_is_rejected_with_the_units_it_takes(pytester):
    result = run(pytester, """
def test_fixture(memtrace_budget):
    memtrace_budget(linear(), (2, 4), limit="lots")

@pytest.mark.vram_limit("lots")
def test_marker():
    pass

def test_no_limit(memtrace_budget):
    memtrace_budget(linear(), (2, 4))

@pytest.mark.vram_limit("1 GiB", gpus="A5000")
def test_misspelt():
    pass

@pytest.mark.vram_limit()
def test_marker_without_limit():
    pass
""")
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines([
        "*ValueError: memtrace_budget: cannot read size 'lots': write a number and a unit, e.g. '24 GiB'*",
        "vram_limit('lots'): cannot read size 'lots': write a number and a unit, e.g. '24 GiB', '24G' (both "
        "2**30) or '24GB' (10**9)*",
        "*ValueError: memtrace_budget: give limit= (e.g. '24 GiB') or gpu= *",
        "vram_limit got unknown arguments ['gpus']; valid: limit, gpu, device",
        "vram_limit: give limit= (e.g. '24 GiB') or gpu= (a card whose usable memory is the limit)",
    ])


# ---- the marker ---------------------------------------------------------------------------------

def test_marker_traces_the_body_to_the_byte(pytester):
    result = run(pytester, BODY + """
@pytest.mark.vram_limit("184 B", device="cpu")
def test_fits():
    step()

@pytest.mark.vram_limit("183 B", device="cpu")
def test_over():
    step()
""", "--memtrace-json=out.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["Training step was limited to 183 B but is predicted to peak at 184 B (+1 B)"])
    fits, over = json.loads((pytester.path / "out.json").read_text())["results"]
    assert (fits["label"], fits["predicted_bytes"], fits["passed"], over["passed"]) == ("test body", 184, True, False)
    assert {k: v for k, v in fits["by_category"].items() if v} == {
        "parameters": 48, "inputs": 32, "gradients": 48, "temporaries": 24 + 4 + 4 + 24}
    assert fits["peak_at"] == "iteration 0, backward, root"


def test_marker_maps_cuda_placements_onto_the_traced_device(pytester):
    # the same step written for a GPU, predicted for one: .cuda(), device="cuda", Module.to("cuda"), an
    # optimizer made in the body (foreach, as CUDA picks it), .item(); two iterations
    result = run(pytester, """
def cuda_step(iterations):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).cuda().to("cuda")
    opt = torch.optim.Adam(model.parameters())
    for _ in range(iterations):
        out = model(torch.randn(2, 4, device="cuda"))
        loss = out.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss.item()

@pytest.mark.vram_limit("1 GiB")
def test_gpu_body():
    cuda_step(2)

def test_same_step_by_fixture(memtrace_budget):
    memtrace_budget(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (2, 4), limit="1 GiB")
""", "--memtrace-json=out.json")
    result.assert_outcomes(passed=2)
    body, fixture = json.loads((pytester.path / "out.json").read_text())["results"]
    # the fixture's loop keeps the previous iteration's output alive, the body does not: one 512 B block
    assert fixture["predicted_bytes"] - body["predicted_bytes"] == 512
    assert body["by_category"]["optimizer_state"] == fixture["by_category"]["optimizer_state"] == 4 * 1024
    assert body["by_category"]["workspaces"] == 2 * lookup("H100").cublas_workspace_bytes()
    assert body["peak_at"] == "iteration 0, optimizer, (optimizer)"


def test_untraceable_bodies_say_why_and_how_to_restructure(pytester):
    result = run(pytester, """
MODEL = linear()  # real, made at import

@pytest.mark.vram_limit("1 GiB")
def test_real_model():
    MODEL(torch.randn(2, 4)).sum().backward()

@pytest.mark.vram_limit("1 GiB")
def test_autocast():
    m = linear()
    with torch.autocast("cuda", dtype=torch.float16):
        m(torch.randn(2, 4)).sum().backward()

@pytest.mark.vram_limit("1 GiB")
def test_value():
    assert linear()(torch.randn(2, 4)).sum().item() != 0
""")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "memtrace could not trace the test body: the body used a real tensor, made before it ran*: build the model "
        "and its inputs inside the body",
        "*use the memtrace_budget fixture*",
        "memtrace could not trace the test body: the body enters torch.autocast('cuda'), which cannot be traced*"
        "amp='fp16' or 'bf16')",
        "memtrace could not trace the test body: an assertion in the body failed on fake tensors, which have no "
        "values ((test body) reads a value from tensor data (.item(), .tolist() or bool(tensor)): 0.0 (assumed*): "
        "AssertionError*",
    ])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_traced_body_matches_report_of_the_same_loop(device):
    # the loop memtrace.report runs, written out as a test body would (on a GPU): the same prediction, byte
    # for byte, category for category
    from memtrace.body import trace_callable
    from memtrace.gpus import DEFAULT_GPU
    from memtrace.options import Inputs, Options
    from memtrace.report import build_callable_report

    from tiny_models import make_cnn

    def body():
        with torch.device("cuda"):
            model = make_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        out = loss = None
        for _ in range(2):
            x = torch.randn(8, 3, 32, 32).cuda()
            out = model(x)
            loss = out.mean()
            torch.autograd.backward(loss)
            opt.step()
            opt.zero_grad()

    options = Options(inputs=Inputs(), optimizer=None, optimizer_name="none", device=device,
                      gpu=lookup(DEFAULT_GPU) if device == "cuda" else None)
    traced = build_callable_report("body", options, *trace_callable(body, options))
    expected = memtrace.report(make_cnn(), (8, 3, 32, 32), optimizer="sgd",
                               optimizer_kwargs={"lr": 0.1, "momentum": 0.9}, device=device)
    assert traced.peak_bytes == expected.peak_bytes
    assert dict(traced.by_category) == dict(expected.by_category)
    assert (traced.peak.iteration, traced.peak.phase, traced.peak.module, traced.peak.op) == (
        expected.peak.iteration, expected.peak.phase, expected.peak.module, expected.peak.op)
    assert (traced.param_count, traced.settings["steps"]) == (expected.param_count, 2)
    rows = lambda r: [(x.name, x.type, x.params, x.param_bytes, x.gradient_bytes, x.optimizer_state_bytes,  # noqa: E731
                       x.activation_bytes) for x in r.layers]
    assert rows(traced) == rows(expected)


def test_traced_body_keeps_the_generator_state_checkpointing_saves_on_the_cpu():
    from torch.utils.checkpoint import checkpoint

    from memtrace.body import trace_callable
    from memtrace.options import Inputs, Options
    from memtrace.report import build_callable_report

    def body():
        model = torch.nn.Linear(16, 16)
        checkpoint(model, torch.randn(4, 16, requires_grad=True), use_reentrant=False).sum().backward()

    options = Options(inputs=Inputs(), optimizer=None, optimizer_name="none", device="cpu", gpu=None)
    traced = build_callable_report("body", options, *trace_callable(body, options))
    state = torch.get_rng_state().untyped_storage().nbytes()
    # one kept from forward to the recomputation, one the recomputation takes while it runs
    assert [a.requested_bytes for a in traced.allocations if a.op == "torch.get_rng_state"] == [state, state]


# ---- summary, JSON, cache -----------------------------------------------------------------------

def test_summary_lists_each_budget_and_can_be_switched_off(pytester):
    source = BODY + """
@pytest.mark.vram_limit("1 KiB", device="cpu")
def test_body():
    step()
"""
    result = run(pytester, source)
    result.stdout.fnmatch_lines([
        "*= memtrace: predicted GPU memory peaks =*",
        "Test * What * Limit * Predicted * Headroom*",
        "test_budget.py::test_body * test body * 1.0 KiB * 184 B * 840 B (82%) * ok",
    ])
    for off in (["--memtrace-no-summary"], ["-o", "memtrace_summary=false"]):
        result = pytester.runpytest(*INNER, *off)
        result.assert_outcomes(passed=1)
        result.stdout.no_fnmatch_line("*memtrace: predicted*")


GROWING = BODY.replace("m = linear()", "m = torch.nn.Linear(4, {width}, bias=False)") + """
@pytest.mark.vram_limit("1 GiB", device="cpu")
def test_step():
    step()
"""


def test_fail_on_increase_compares_with_the_previous_run(pytester):
    guard = "--memtrace-fail-on-increase"
    assert run(pytester, GROWING.format(width=3), guard).ret == 0  # nothing stored yet: nothing to compare
    result = run(pytester, GROWING.format(width=4), guard)
    # width 4: weight 64 + x 32 + out 32 + loss 4 + ones 4 + grad_out 32 + grad 64 = 232 B
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["Predicted peak grew from 184 B to 232 B (+48 B, +26.1%) since the last run, more "
                                 "than the allowed 1 B (--memtrace-fail-on-increase)"])
    run(pytester, GROWING.format(width=4), guard).assert_outcomes(failed=1)  # still rejected: 184 B is kept
    run(pytester, GROWING.format(width=4), guard, "--memtrace-tolerance=30%").assert_outcomes(passed=1)
    run(pytester, GROWING.format(width=4), guard, "--memtrace-tolerance=48 B").assert_outcomes(passed=1)
    run(pytester, GROWING.format(width=4)).assert_outcomes(passed=1)  # without the guard: 232 B accepted
    run(pytester, GROWING.format(width=4), guard).assert_outcomes(passed=1)
    run(pytester, GROWING.format(width=3), guard).assert_outcomes(passed=1)  # shrinking is fine
    result = run(pytester, GROWING.format(width=3), guard, "--memtrace-tolerance=some")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--memtrace-tolerance='some': cannot read size 'some'*or a percentage such as '1%'"])


def test_json_holds_every_prediction(pytester):
    result = run(pytester, BODY + """
@pytest.mark.vram_limit("1 KiB", device="cpu")
def test_body():
    step()

def test_two(memtrace_budget):
    memtrace_budget(linear(), (2, 4), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu", limit="1 KiB")
    memtrace_budget(linear(), (4, 4), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu", limit="1 KiB")
""", "--memtrace-json=out.json")
    result.assert_outcomes(passed=2)
    data = json.loads((pytester.path / "out.json").read_text())
    assert data["schema_version"] == 1
    rows = [(e["key"], e["limit_bytes"], e["predicted_bytes"], e["headroom_bytes"], e["passed"]) for e in data["results"]]
    # batch 4: x 64, out 48, grad_out 48 -> 184 + 32 + 24 + 24 = 264
    assert rows == [("test_budget.py::test_body", 1024, 184, 840, True),
                    ("test_budget.py::test_two", 1024, 184, 840, True),
                    ("test_budget.py::test_two#2", 1024, 264, 760, True)]


# ---- live checks and xdist ------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the live check runs: test_live_on_cuda")
def test_live_without_cuda_skips_with_a_reason(pytester):
    result = run(pytester, BODY + """
@pytest.mark.vram_limit("1 KiB", device="cpu")
def test_body():
    step()

def test_fixture(memtrace_budget):
    memtrace_budget(linear(), (2, 4), limit="1 GiB")

@pytest.mark.vram_limit("100 B", device="cpu")
def test_over():
    step()
""", "--memtrace-live", "-rs")
    result.assert_outcomes(skipped=2, failed=1)  # over the limit fails on the prediction alone
    result.stdout.fnmatch_lines([
        "SKIPPED * --memtrace-live: no CUDA device: torch.cuda.is_available() is False; the prediction (184 B of "
        "1.0 KiB) passed",
    ])
    result.stdout.fnmatch_lines(["test_budget.py::test_body * 184 B * skipped * ok"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_live_on_cuda(pytester):
    result = run(pytester, """
def test_fixture(memtrace_budget):
    r = memtrace_budget(linear(), (2, 4), limit="1 GiB")
    assert r.measured is not None

@pytest.mark.vram_limit("1 GiB")
def test_body():
    m = linear().cuda()
    m(torch.randn(2, 4, device="cuda")).mean().backward()
""", "--memtrace-live", "--memtrace-json=out.json")
    result.assert_outcomes(passed=2)
    for entry in json.loads((pytester.path / "out.json").read_text())["results"]:
        assert entry["measured_bytes"] > 0 and entry["measured_on"]


def test_results_are_gathered_from_xdist_workers(pytester):
    pytest.importorskip("xdist")
    result = run(pytester, BODY + """
@pytest.mark.parametrize("i", range(4))
@pytest.mark.vram_limit("1 KiB", device="cpu")
def test_body(i):
    step()
""", "-p", "xdist.plugin", "-n", "2", "--memtrace-json=out.json")
    result.assert_outcomes(passed=4)
    entries = json.loads((pytester.path / "out.json").read_text())["results"]
    assert sorted(e["key"] for e in entries) == [f"test_budget.py::test_body[{i}]" for i in range(4)]
    assert {e["predicted_bytes"] for e in entries} == {184}
    result.stdout.fnmatch_lines(["*= memtrace: predicted GPU memory peaks =*"])
