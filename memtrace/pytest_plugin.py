"""memtrace's pytest plugin: GPU memory budgets as tests, checked without a GPU.

Installed with the package (the ``pytest11`` entry point ``memtrace``). Two ways to write a budget:

- the ``memtrace_budget`` fixture predicts a model's training step (``memtrace.report`` with the same
  arguments) and fails the test when the predicted peak is over ``limit=`` (``"24 GiB"``, ``"24G"``: 2**30
  bytes; ``"24GB"``: 10**9) or over the usable memory of ``gpu=``; it returns the report;
- ``@pytest.mark.vram_limit("8 GiB")`` runs the test body itself under memtrace's tracing, on fake tensors,
  and fails when what the body allocates is predicted to peak over the limit.

Options: ``--memtrace-live`` also runs the real step where CUDA is available (skips with a reason where it
is not), ``--memtrace-json PATH`` writes every prediction, ``--memtrace-fail-on-increase`` fails a test whose
prediction grew since the previous run (pytest's cache) by more than ``--memtrace-tolerance``, and the
end-of-session summary is switched off with ``--memtrace-no-summary`` or ``memtrace_summary = false``.
Under pytest-xdist each result travels in the test report's ``user_properties`` and the controller gathers
them.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
from dataclasses import asdict, dataclass, replace

import pytest

from .units import format_bytes, parse_size

CACHE_KEY = "memtrace/predicted_bytes"
PROPERTY = "memtrace"  # the user_properties name a result travels under
TOP_LAYERS = 5


@dataclass(frozen=True)
class BudgetResult:
    """One budget check: the limit, the prediction, and what it was compared with."""

    key: str  # the test's node id, with "#2", "#3" for further checks in one test
    label: str  # what was predicted: the model's class, or "test body"
    limit_bytes: int
    limit_source: str  # how the limit was given: "24 GiB", or "A5000 usable memory"
    predicted_bytes: int
    gpu: str | None
    by_category: dict
    peak_at: str
    previous_bytes: int | None = None  # the prediction stored by the previous run
    allowed_growth_bytes: int | None = None  # with --memtrace-fail-on-increase
    measured_bytes: int | None = None  # --memtrace-live on a CUDA machine
    measured_on: str | None = None
    live_skipped: str | None = None  # why the live check did not run

    @property
    def headroom_bytes(self) -> int:
        return self.limit_bytes - self.predicted_bytes

    @property
    def over(self) -> bool:
        return self.predicted_bytes > self.limit_bytes

    @property
    def measured_over(self) -> bool:
        return self.measured_bytes is not None and self.measured_bytes > self.limit_bytes

    @property
    def grew(self) -> bool:
        return (self.allowed_growth_bytes is not None and self.previous_bytes is not None
                and self.predicted_bytes - self.previous_bytes > self.allowed_growth_bytes)

    @property
    def failed(self) -> bool:
        return self.over or self.measured_over or self.grew

    @property
    def long_repr(self) -> str:
        """The failure message, one line per broken check; empty when the budget holds."""
        limit = format_bytes(self.limit_bytes)
        if self.limit_source != limit:
            limit += f" ({self.limit_source})"
        lines = []
        if self.over:
            lines.append(f"Training step was limited to {limit} but is predicted to peak at "
                         f"{format_bytes(self.predicted_bytes)} (+{format_bytes(-self.headroom_bytes)})")
        if self.measured_over:
            lines.append(f"Training step was limited to {limit} but measured max_memory_allocated() peaked at "
                         f"{format_bytes(self.measured_bytes)} (+{format_bytes(self.measured_bytes - self.limit_bytes)}) "
                         f"on {self.measured_on}; predicted {format_bytes(self.predicted_bytes)}")
        if self.grew:
            growth = self.predicted_bytes - self.previous_bytes
            lines.append(f"Predicted peak grew from {format_bytes(self.previous_bytes)} to "
                         f"{format_bytes(self.predicted_bytes)} (+{format_bytes(growth)}, "
                         f"{100 * growth / max(self.previous_bytes, 1):+.1f}%) since the last run, more than the "
                         f"allowed {format_bytes(self.allowed_growth_bytes)} (--memtrace-fail-on-increase)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "headroom_bytes": self.headroom_bytes, "passed": not self.failed}

    @classmethod
    def from_dict(cls, d: dict) -> BudgetResult:
        return cls(**{k: v for k, v in d.items() if k not in ("headroom_bytes", "passed")})


def breakdown(report) -> str:
    """The report section of a budget: where the peak is, the bytes by category and the top layers."""
    from tabulate import tabulate

    from .render import category_table, peak_lines

    lines = [*peak_lines(report), "", category_table(report)]
    names = [row.name for row in report.layers if row.type != "-"]  # "-": memory outside any module
    leaves = [row for row in report.layers if row.type != "-" and not any(
        n != row.name and (not row.name or n.startswith(row.name + ".")) for n in names)]
    total = lambda r: r.param_bytes + r.gradient_bytes + r.optimizer_state_bytes + r.activation_bytes  # noqa: E731
    top = sorted((r for r in leaves if total(r)), key=total, reverse=True)[:TOP_LAYERS]
    if top:
        rows = [[r.name or r.type, r.type, format_bytes(r.param_bytes), format_bytes(r.gradient_bytes),
                 format_bytes(r.optimizer_state_bytes), format_bytes(r.activation_bytes), format_bytes(total(r))]
                for r in top]
        lines += ["", "Top layers by memory (parameters, gradients, optimizer state, activations):",
                  tabulate(rows, headers=["Layer", "Type", "Params", "Grads", "Optim state", "Activations", "Total"],
                           disable_numparse=True, colalign=("left", "left") + ("right",) * 5)]
    if report.assumptions:
        lines += ["", "Assumptions:", *(f"  - {a}" for a in report.assumptions)]
    return "\n".join(lines)


def parse_limit(limit, gpu, where: str) -> tuple[int, str]:
    """The budget in bytes and how it was given: ``limit=`` as a size, else ``gpu=``'s usable memory."""
    from .gpus import lookup

    if limit is None:
        if gpu is None:
            raise ValueError(f"{where}: give limit= (e.g. '24 GiB') or gpu= (a card whose usable memory is the limit)")
        card = lookup(gpu)
        return card.usable_bytes(), f"{card.name} usable memory"
    try:
        nbytes = parse_size(limit)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    decimal = isinstance(limit, str) and limit.strip()[-2:].lower() in ("kb", "mb", "gb", "tb")
    return nbytes, limit.strip() if decimal else format_bytes(nbytes)  # "16 GB" is shown beside its 14.9 GiB


def parse_tolerance(text: str) -> tuple[float, int]:
    """``"1%"`` -> (1.0, 0); ``"64 MiB"`` -> (0.0, 67108864)."""
    text = str(text).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            pct = -1.0
        if pct < 0:
            raise pytest.UsageError(f"--memtrace-tolerance={text!r}: write a percentage ('1%') or a size ('64 MiB')")
        return pct, 0
    try:
        return 0.0, parse_size(text)
    except ValueError as exc:
        raise pytest.UsageError(f"--memtrace-tolerance={text!r}: {exc}; or a percentage such as '1%'") from None


class MemtraceManager:
    """Holds the session's options and results; registered as a plugin in ``pytest_configure``."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.live = config.getoption("memtrace_live")
        self.summary = config.getini("memtrace_summary") and not config.getoption("memtrace_no_summary")
        self.json_path = config.getoption("memtrace_json")
        self.fail_on_increase = config.getoption("memtrace_fail_on_increase")
        self.tolerance = parse_tolerance(config.getoption("memtrace_tolerance"))
        self.is_worker = hasattr(config, "workerinput")  # a pytest-xdist worker: the controller reports
        self.cache = getattr(config, "cache", None)
        if self.fail_on_increase and self.cache is None:
            raise pytest.UsageError("--memtrace-fail-on-increase needs pytest's cache (-p cacheprovider)")
        self.baseline: dict = self.cache.get(CACHE_KEY, {}) if self.cache is not None else {}
        self.results: list[BudgetResult] = []
        self.tracing_body = False

    # ---- checks ----------------------------------------------------------------------------------
    def check(self, item, report, limit_bytes: int, limit_source: str, label: str) -> BudgetResult:
        """Compare a report with its budget and with the previous run; the result joins the test report."""
        count = item.stash.get(_CHECKS, 0) + 1
        item.stash[_CHECKS] = count
        key = item.nodeid if count == 1 else f"{item.nodeid}#{count}"
        previous = self.baseline.get(key)
        allowed = None
        if self.fail_on_increase and previous is not None:
            pct, nbytes = self.tolerance
            allowed = max(nbytes, int(previous * pct / 100))
        measured = getattr(report, "measured", None)
        peak = report.peak
        place = peak.module if peak.module.startswith("(") else f"module '{peak.module}'" if peak.module else "root"
        result = BudgetResult(
            key=key, label=label, limit_bytes=limit_bytes, limit_source=limit_source,
            predicted_bytes=report.peak_bytes, gpu=report.settings.get("gpu"),
            by_category={c.value: n for c, n in report.by_category.items()},
            peak_at=f"iteration {peak.iteration}, {peak.phase.value}, {place}",
            previous_bytes=previous, allowed_growth_bytes=allowed,
            measured_bytes=measured.peak_bytes if measured is not None else None,
            measured_on=(measured.device_name or measured.device) if measured is not None else None,
        )
        item.add_report_section("call", "memtrace", breakdown(report))
        return result

    def conclude(self, item, result: BudgetResult) -> None:
        """Attach the result to the test and fail or skip it as the result says."""
        if self.live and result.measured_bytes is None and not result.failed:
            result = replace(result, live_skipped="no CUDA device: torch.cuda.is_available() is False")
        item.user_properties.append((PROPERTY, result.to_dict()))
        if result.failed:
            pytest.fail(result.long_repr, pytrace=False)
        if result.live_skipped:
            pytest.skip(f"--memtrace-live: {result.live_skipped}; the prediction "
                        f"({format_bytes(result.predicted_bytes)} of {format_bytes(result.limit_bytes)}) passed")

    # ---- the marker ------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem):
        marker = pyfuncitem.get_closest_marker("vram_limit")
        if marker is None:
            return None
        run_marked_body(self, pyfuncitem, marker)
        return True

    # ---- gathering (in the process that reports: the only one, or the xdist controller) ------------
    def pytest_runtest_logreport(self, report):
        if self.is_worker or report.when != "call":
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                self.results.append(BudgetResult.from_dict(value))

    def pytest_terminal_summary(self, terminalreporter):
        if self.is_worker or not self.summary or not self.results:
            return
        from tabulate import tabulate

        rows = []
        for r in self.results:
            share = f" ({100 * r.headroom_bytes / r.limit_bytes:.0f}%)" if r.limit_bytes else ""
            row = [r.key, r.label, format_bytes(r.limit_bytes), format_bytes(r.predicted_bytes),
                   format_bytes(r.headroom_bytes) + share]
            if self.live:
                row.append(format_bytes(r.measured_bytes) if r.measured_bytes is not None else "skipped")
            row.append("FAIL" if r.failed else "ok")
            rows.append(row)
        headers = ["Test", "What", "Limit", "Predicted", "Headroom"] + (["Measured"] if self.live else []) + ["Result"]
        terminalreporter.write_sep("=", "memtrace: predicted GPU memory peaks")
        terminalreporter.write_line(tabulate(rows, headers=headers, disable_numparse=True))

    def pytest_sessionfinish(self, session):
        if self.is_worker:
            return
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"schema_version": 1, "results": [r.to_dict() for r in self.results]}, f, indent=2)
        if self.cache is not None and self.results:
            stored = dict(self.baseline)
            for r in self.results:
                if not r.grew:  # a rejected increase stays rejected until a run without the guard stores it
                    stored[r.key] = r.predicted_bytes
            self.cache.set(CACHE_KEY, stored)


_CHECKS = pytest.StashKey[int]()
_MANAGER = "memtrace-manager"


def _manager(config: pytest.Config) -> MemtraceManager:
    return config.pluginmanager.get_plugin(_MANAGER)


# ---- the fixture -----------------------------------------------------------------------------------

@pytest.fixture
def memtrace_budget(request):
    """``memtrace_budget(model, input_shape, ..., limit="24 GiB" | gpu="A5000")`` predicts the training step
    with ``memtrace.report`` (every other argument is passed on), fails the test when the predicted peak is
    over the budget, and returns the report. ``gpu=`` names the card predicted for and, without
    ``limit=``, makes its usable memory the budget. With ``parallel=`` the budget is one GPU's: the rank
    with the largest peak is checked."""
    manager = _manager(request.config)

    def budget(model, input_shape=None, *, limit=None, gpu=None, **kwargs):
        import torch

        import memtrace

        if manager.tracing_body:
            raise RuntimeError("memtrace_budget cannot run inside a @pytest.mark.vram_limit test: use one or the other")
        limit_bytes, source = parse_limit(limit, gpu, "memtrace_budget")
        # a parallel= step runs on its ranks: it is predicted, not measured in this one process
        verify = manager.live and torch.cuda.is_available() and kwargs.get("parallel") is None
        report = memtrace.report(model, input_shape, gpu=gpu, verify=verify, **kwargs)
        label = report.model
        if report.parallel:
            label += f", rank {report.rank} of {report.world_size} ({report.parallel})"
        manager.conclude(request.node, manager.check(request.node, report, limit_bytes, source, label))
        return report

    return budget


# ---- the marker ------------------------------------------------------------------------------------

_RESTRUCTURE = (
    "memtrace runs a @pytest.mark.vram_limit test body on fake tensors: no values, no GPU, every tensor made "
    "inside the body. To budget this step, build the model in the test and use the memtrace_budget fixture "
    "(memtrace_budget(model, input_shape=..., optimizer=..., amp=..., limit=...)), and check values in a test "
    "of their own.")


def _marker_arguments(marker) -> tuple:
    args, kwargs = list(marker.args), dict(marker.kwargs)
    if len(args) > 1:
        raise ValueError(f"vram_limit takes one positional argument, the limit; got {marker.args!r}")
    limit = args[0] if args else kwargs.pop("limit", None)
    gpu = kwargs.pop("gpu", None)
    device = kwargs.pop("device", "cuda")
    if kwargs:
        raise ValueError(f"vram_limit got unknown arguments {sorted(kwargs)}; valid: limit, gpu, device")
    return limit, gpu, device


def run_marked_body(manager: MemtraceManager, item, marker) -> None:
    from .body import trace_callable
    from .engine import TraceError
    from .options import DEVICES, Inputs, Options
    from .gpus import DEFAULT_GPU, lookup
    from .report import build_callable_report

    problem = None  # pytest.fail is raised outside the except blocks, so the failure is this one message
    try:
        limit, gpu, device = _marker_arguments(marker)
        limit_bytes, source = parse_limit(limit, gpu, "vram_limit" if limit is None else f"vram_limit({limit!r})")
        if device not in DEVICES:
            raise ValueError(f"vram_limit(device={device!r}) is unknown; valid: 'cuda', 'cpu'")
        if gpu is not None and device != "cuda":
            raise ValueError(f"vram_limit(gpu={gpu!r}) given with device={device!r}; gpu= names a CUDA card")
        card = lookup(gpu if gpu is not None else DEFAULT_GPU) if device == "cuda" else None
    except ValueError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(problem, pytrace=False)
    fn = item.obj
    if inspect.iscoroutinefunction(fn):
        pytest.fail("vram_limit cannot trace an async test body; " + _RESTRUCTURE, pytrace=False)
    body = functools.partial(fn, **{name: item.funcargs[name] for name in item._fixtureinfo.argnames})
    options = Options(inputs=Inputs(), optimizer=None, optimizer_name="none", device=device, gpu=card)
    manager.tracing_body = True
    try:
        trace, session = trace_callable(body, options)
    except TraceError as exc:
        problem = f"memtrace could not trace the test body: {exc}\n{_RESTRUCTURE}"
    finally:
        manager.tracing_body = False
    if problem:
        pytest.fail(problem, pytrace=False)
    report = build_callable_report(item.name, options, trace, session)
    result = manager.check(item, report, limit_bytes, source, "test body")
    if manager.live and not result.failed:
        result = _measure_live(body, result)
    manager.conclude(item, result)


def _measure_live(body, result: BudgetResult) -> BudgetResult:
    """Run the body for real on the GPU and add its measured ``max_memory_allocated()``."""
    import torch

    from .measure import _clear_cublas_workspaces

    if not torch.cuda.is_available():
        return result  # conclude() skips with the reason
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    _clear_cublas_workspaces()  # a fresh process has none yet, and the prediction counts them
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    body()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    if measured == 0:
        return replace(result, live_skipped="the body allocated nothing on CUDA; put its model and tensors on "
                                            "'cuda' to check it live")
    return replace(result, measured_bytes=measured, measured_on=torch.cuda.get_device_name())


# ---- hooks -----------------------------------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("memtrace", "memtrace GPU memory budgets")
    group.addoption("--memtrace-live", action="store_true", default=False,
                    help="where CUDA is available, also run each budgeted step for real and check the measured "
                         "max_memory_allocated() against the limit; where it is not, skip those tests with a reason")
    group.addoption("--memtrace-no-summary", action="store_true", default=False,
                    help="leave out the end-of-session table of predicted peaks")
    group.addoption("--memtrace-json", metavar="PATH", default=None,
                    help="write every budget's limit, prediction and breakdown to PATH as JSON")
    group.addoption("--memtrace-fail-on-increase", action="store_true", default=False,
                    help="fail a test whose predicted peak grew since the previous run (stored in pytest's cache) "
                         "by more than --memtrace-tolerance")
    group.addoption("--memtrace-tolerance", metavar="AMOUNT", default="1%",
                    help="growth allowed by --memtrace-fail-on-increase: a percentage ('1%', the default) or a "
                         "size ('64 MiB')")
    parser.addini("memtrace_summary", type="bool", default=True,
                  help="print the table of predicted peaks at the end of the session (default true)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "vram_limit(limit=None, *, gpu=None, device='cuda'): trace the test body with memtrace on fake tensors "
        "and fail when its predicted GPU memory peak is over limit ('8 GiB', '8G', '8GB'=10**9 B) or over the "
        "usable memory of gpu ('A5000')")
    config.pluginmanager.register(MemtraceManager(config), _MANAGER)
