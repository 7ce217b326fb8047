"""The immutable result of one estimate, built from a ``Trace`` and an allocator model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .datadep import ITEM, describe_choices
from . import quantized
from .engine import Trace
from .options import Category, Options, Phase

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerRow:
    """One module; byte columns cover the module and everything below it."""

    name: str  # dotted named_modules() path, "" for the root
    type: str
    depth: int
    output_shape: tuple[int, ...] | None
    params: int
    param_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # saved for backward by ops run inside it (first iteration)


@dataclass(frozen=True)
class Peak:
    allocated_bytes: int
    iteration: int
    phase: Phase
    module: str
    op: str
    event: int


@dataclass(frozen=True)
class PhaseSpan:
    phase: Phase
    iteration: int
    start_event: int
    end_event: int  # exclusive
    peak_bytes: int


@dataclass(frozen=True)
class Allocation:
    index: int
    charged_bytes: int  # what the allocator model charges for it
    requested_bytes: int
    category: Category
    module: str
    phase: Phase
    iteration: int
    op: str
    alloc_event: int
    free_event: int | None  # None: still live when the last iteration ended


@dataclass(frozen=True)
class OpRow:
    """What the allocations one op made in one module, phase and iteration hold at the peak."""

    op: str
    module: str  # the module running (the loss, the optimizer: in parentheses)
    phase: Phase
    iteration: int
    category: Category
    allocations: int
    bytes: int  # charged bytes live at the peak


@dataclass(frozen=True)
class RankPeak:
    """The ranks of a parallel run that hold the same memory (the same shards), and their peak."""

    ranks: tuple[int, ...]
    peak_bytes: int


@dataclass(frozen=True)
class Timeline:
    """Allocated bytes after each allocation or free on the device, in the order they happened."""

    ops: tuple[int, ...]  # index of the traced op at each event
    allocated_bytes: tuple[int, ...]
    phases: tuple[PhaseSpan, ...]


@dataclass(frozen=True)
class Report:
    model: str
    device: str
    allocator: str
    settings: Mapping[str, Any]
    peak_bytes: int
    peak: Peak
    by_category: Mapping[Category, int]
    layers: tuple[LayerRow, ...]
    timeline: Timeline
    allocations: tuple[Allocation, ...]
    param_count: int
    trainable_param_count: int
    reserved_peak_bytes: int | None
    traced_ops: int
    assumptions: tuple[str, ...]
    notes: tuple[str, ...]
    measured: Any = None  # a memtrace.measure.Measurement of the real step, with verify=True
    # FLOPs of the first iteration per phase (matmuls, convolutions, attention; torch.utils.flop_counter's
    # formulas), counted in the same trace
    flops: Mapping[Phase, int] = field(default_factory=lambda: MappingProxyType({}))
    # a parallel run (parallel=): how the model is parallelized, the rank this report is of (the one with
    # the largest peak), and every group of ranks with the same memory
    parallel: str | None = None
    world_size: int = 1
    rank: int = 0
    ranks: tuple[RankPeak, ...] = ()
    # how to trace the step again (the model and options), for graph(); not part of the report's value
    source: Any = field(default=None, compare=False, repr=False)

    @property
    def flops_per_iteration(self) -> int:
        return sum(self.flops.values())

    @property
    def error_percent(self) -> float | None:
        """(predicted - measured) / measured, in percent, when the real step was measured."""
        if self.measured is None or not self.measured.peak_bytes:
            return None
        return 100.0 * (self.peak_bytes - self.measured.peak_bytes) / self.measured.peak_bytes

    def graph(self) -> "torch.fx.GraphModule":
        """The step as a ``torch.fx.GraphModule`` of aten ops (copy of the parameters, forward, loss, backward,
        optimizer, every iteration), each node's ``meta["memtrace"]`` holding the bytes it allocates and frees,
        the live bytes after it, its module and phase (``memtrace.graph``). Traced again when asked for; the
        same step, op for op, as this report's."""
        if self.source is None:
            raise ValueError("this report cannot trace its step again (it was built from a trace, not by "
                             "memtrace.report); call memtrace.report(...).graph()")
        from .graph import step_graph

        model, options = self.source
        return step_graph(model, options, rank=self.rank)

    def by_op(self) -> tuple[OpRow, ...]:
        """The allocations live at the peak by the op that made them (with its module, phase, iteration and
        category), largest first: what each op contributes to the peak, including ops no module owns (the
        loss, the optimizer's foreach ops) and the rules' workspaces and scratch (labelled by the rule)."""
        at = self.peak.event
        groups: dict[tuple, list[int]] = {}
        for a in self.allocations:
            if a.alloc_event <= at and (a.free_event is None or a.free_event > at) and a.charged_bytes:
                g = groups.setdefault((a.op, a.module, a.phase, a.iteration, a.category), [0, 0])
                g[0] += 1
                g[1] += a.charged_bytes
        rows = [OpRow(op, module, phase, it, category, n, nbytes)
                for (op, module, phase, it, category), (n, nbytes) in groups.items()]
        return tuple(sorted(rows, key=lambda r: (-r.bytes, r.phase.value, r.iteration, r.module, r.op)))

    def layer(self, name: str) -> LayerRow:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer named {name!r}")

    def to_dict(self, *, allocations: bool = True) -> dict[str, Any]:
        d = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "device": self.device,
            "allocator": self.allocator,
            "settings": dict(self.settings),
            "peak_bytes": self.peak_bytes,
            "peak": {**asdict(self.peak), "phase": self.peak.phase.value},
            "by_category": {c.value: n for c, n in self.by_category.items()},
            "param_count": self.param_count,
            "trainable_param_count": self.trainable_param_count,
            "reserved_peak_bytes": self.reserved_peak_bytes,
            "traced_ops": self.traced_ops,
            "layers": [{**asdict(r), "output_shape": list(r.output_shape) if r.output_shape else None}
                       for r in self.layers],
            "timeline": {
                "ops": list(self.timeline.ops),
                "allocated_bytes": list(self.timeline.allocated_bytes),
                "phases": [{**asdict(p), "phase": p.phase.value} for p in self.timeline.phases],
            },
            "assumptions": list(self.assumptions),
            "notes": list(self.notes),
            "flops": {p.value: n for p, n in self.flops.items()},
            "parallel": None if self.parallel is None else {
                "plan": self.parallel, "world_size": self.world_size, "rank": self.rank,
                "ranks": [{"ranks": list(r.ranks), "peak_bytes": r.peak_bytes} for r in self.ranks]},
            "measured": None if self.measured is None else {**self.measured.to_dict(),
                                                            "error_percent": self.error_percent},
        }
        if allocations:
            d["allocations"] = [
                {**asdict(a), "category": a.category.value, "phase": a.phase.value} for a in self.allocations
            ]
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, depth: int = 3) -> str:
        from .render import render_report

        return render_report(self, depth=depth)

    def plot(self, path, **kwargs) -> None:
        """Draw allocated bytes over the step, stacked by category, into ``path``; see ``memtrace.plot.plot``."""
        from .plot import plot

        plot(self, path, **kwargs)

    def save_snapshot(self, path) -> None:
        """Write the predicted allocations as a CUDA memory snapshot pickle, for pytorch.org/memory_viz."""
        from .snapshot import save_snapshot

        save_snapshot(self, path)

    def __str__(self) -> str:
        return self.table()


def _settings(options: Options) -> dict[str, Any]:
    return {
        "optimizer": options.optimizer_name,
        "optimizer_kwargs": {k: repr(v) for k, v in options.optimizer_kwargs.items()},
        "amp": options.amp_name,
        "dtype": options.param_dtypes,
        "steps": options.steps,
        "accumulation_steps": options.accumulation_steps,
        "train": options.train,
        "gpu": options.gpu.name if options.gpu else None,
        "checkpoint": list(options.checkpoint),
        "alloc_conf": options.alloc_conf,
        "compile": None if options.compile is None else dict(options.compile),
        **({} if options.keep_output else {"keep_output": False}),
        "inputs": [
            {"key": s.key, "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}
            for s in options.inputs.specs
        ],
    }


def _canonical_events(trace: Trace) -> list[tuple[tuple[int, bool], int]]:
    """Events with each run of frees that happened inside one op sorted by record index.

    Such frees are simultaneous (e.g. autocast clearing its cast cache walks a hash map whose order
    depends on addresses); sorting them makes two estimates of the same step identical."""
    out, run = [], []
    for item in zip(trace.events, trace.event_ops):
        (_, is_alloc), op = item
        if not is_alloc and (not run or run[-1][1] == op):
            run.append(item)
            continue
        out += sorted(run, key=lambda e: e[0][0])
        run = [] if is_alloc else [item]
        if is_alloc:
            out.append(item)
    return out + sorted(run, key=lambda e: e[0][0])


def build_report(model: torch.nn.Module, options: Options, trace: Trace) -> Report:
    records = trace.records
    position = {}  # record index -> (alloc position, free position) in the device timeline
    sequence = []
    ops = []
    for pos, ((i, is_alloc), op) in enumerate(e for e in _canonical_events(trace) if not records[e[0][0]].host):
        sequence.append((i, records[i].nbytes, is_alloc))
        ops.append(op)
        position.setdefault(i, [pos, None])
        if not is_alloc:
            position[i][1] = pos
    charges = trace.target.allocator.replay(sequence)
    charged = charges.charged

    totals = []
    total = peak = 0
    peak_pos = 0
    for pos, (i, _, is_alloc) in enumerate(sequence):
        total += charged[i] if is_alloc else -charged[i]
        totals.append(total)
        if total > peak:
            peak, peak_pos = total, pos
    peak_index = sequence[peak_pos][0] if sequence else None

    allocations = tuple(
        Allocation(
            index=i, charged_bytes=charged[i], requested_bytes=records[i].nbytes, category=records[i].category,
            module=records[i].module, phase=records[i].phase, iteration=records[i].iteration,
            op=str(records[i].op), alloc_event=a, free_event=f,
        )
        for i, (a, f) in position.items()
    )
    by_category = {c: 0 for c in Category}
    for a in allocations:
        if a.alloc_event <= peak_pos and (a.free_event is None or a.free_event > peak_pos):
            by_category[a.category] += a.charged_bytes
    assert sum(by_category.values()) == peak

    if peak_index is not None:
        rec = records[peak_index]
        peak_at = Peak(peak, rec.iteration, rec.phase, rec.module, str(rec.op), peak_pos)
    else:
        peak_at = Peak(0, 0, Phase.SETUP, "", "", 0)

    spans = []
    starts = [(ph, it, _device_pos(start, trace, records)) for ph, it, start in trace.phase_starts]
    for k, (ph, it, start) in enumerate(starts):
        end = starts[k + 1][2] if k + 1 < len(starts) else len(sequence)
        span_peak = max(totals[start:end], default=totals[start - 1] if 0 < start <= len(totals) else 0)
        spans.append(PhaseSpan(ph, it, start, end, span_peak))

    layers = _layer_rows(trace, charged)
    param_count = sum(quantized.numel(p) for p in model.parameters())  # each shared parameter once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assumptions = _assumptions(trace.assumptions, options)
    return Report(
        model=type(model).__name__,
        device=trace.target.name,
        allocator=trace.target.allocator.label,
        settings=MappingProxyType(_settings(options)),
        peak_bytes=peak,
        peak=peak_at,
        by_category=MappingProxyType(by_category),
        layers=layers,
        timeline=Timeline(tuple(ops), tuple(totals), tuple(spans)),
        allocations=allocations,
        param_count=param_count,
        trainable_param_count=trainable,
        reserved_peak_bytes=charges.reserved_peak_bytes if trace.target.name == "cuda" else None,
        traced_ops=trace.op_count,
        assumptions=assumptions,
        notes=trace.target.notes + trace.notes,
        flops=MappingProxyType(dict(trace.flops)),
    )


def _device_pos(event_index: int, trace: Trace, records) -> int:
    """Position in the device timeline of the first device event at or after ``event_index``."""
    return sum(1 for i, _ in trace.events[:event_index] if not records[i].host)


def _assumptions(choices, options: Options) -> tuple[str, ...]:
    """The data-dependent sizes and values the trace chose, one line per place."""
    scaler = options.uses_grad_scaler and any(c.module == "(optimizer)" and c.op == ITEM for c in choices)
    lines = ["GradScaler's inf/NaN check has no data: assumed finite gradients, so every step is taken"] if scaler else []
    return tuple(lines + describe_choices(choices, skip=lambda c: scaler and c.module == "(optimizer)"
                                          and c.op == ITEM))


def _layer_rows(trace: Trace, charged: dict[int, int]) -> tuple[LayerRow, ...]:
    own: dict[str, list[int]] = {m.name: [0, 0, 0, 0, 0] for m in trace.modules}
    counted: set[int] = set()  # FSDP keeps a unit's gradients as views of one reduce-scatter output: once

    def once(recs) -> list:
        fresh = [r for r in recs if r.index not in counted]
        counted.update(r.index for r in fresh)
        return fresh

    for pname, rec in trace.param_records.items():
        mod = trace.param_owner[pname]
        entry = own[mod]
        entry[1] += sum(charged.get(r.index, 0) for r in once([rec]))
        grads = once(trace.grad_records.get(pname, []))
        entry[2] += max((charged.get(r.index, 0) for r in grads), default=0)
        entry[3] += sum(charged.get(r.index, 0) for r in once(trace.state_records.get(pname, [])) if not r.host)
    for m in trace.modules:
        own[m.name][0] = sum(quantized.numel(p) for p in m.params)
    outside: dict[str, int] = {}
    for rec in trace.records:
        if rec.category is Category.ACTIVATION and rec.iteration == 0 and rec.phase is Phase.FORWARD:
            if rec.module in own:
                own[rec.module][4] += charged.get(rec.index, 0)
            else:
                outside[rec.module] = outside.get(rec.module, 0) + charged.get(rec.index, 0)
    rows = []
    names = [m.name for m in trace.modules]
    for m in trace.modules:
        prefix = m.name + "."
        sub = [n for n in names if n == m.name or not m.name or n.startswith(prefix)]
        sums = [sum(own[n][k] for n in sub) for k in range(5)]
        rows.append(LayerRow(m.name, m.type, m.depth, m.output_shape, *sums))
    for label, nbytes in outside.items():
        rows.append(LayerRow(label, "-", 1, None, 0, 0, 0, 0, nbytes))
    return tuple(rows)


def build_callable_report(name: str, options: Options, trace: Trace, session) -> Report:
    """The report of a traced callable (``body.trace_callable``). The call built its own model, optimizer
    and inputs, so the settings say so, and the parameter counts are those the call had alive at once."""
    from dataclasses import replace

    report = build_report(torch.nn.Module(), options, trace)  # an empty module: the call owns no model
    as_called = "as in the call"
    settings = {**report.settings, "optimizer": as_called, "optimizer_kwargs": {}, "amp": as_called,
                "dtype": as_called, "steps": session.iteration + 1, "inputs": []}
    return replace(report, model=name, settings=MappingProxyType(settings), param_count=session.param_count,
                   trainable_param_count=session.trainable_count)
