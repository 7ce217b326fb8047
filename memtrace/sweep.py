"""One estimate's traces, and reports at other batch sizes replayed from the traces at two.

``trace_step`` traces the step (once, or once per group of ranks that hold different memory) and
``assemble`` makes the report from the traces. ``Line`` takes the traces of the same step at two batch
sizes: where they line up (the same ops, modules, phases and order of allocations and frees, every size
affine in the batch with an integer slope), the trace at another batch size differs from them only in
sizes, so its report is the allocator model's replay of the sizes on the line, without tracing. The
allocations a rule sizes by a function of the op's shapes (``StorageTracker.allocate_sized``: a reduction's
scratch, which it makes above some size only, the cuBLAS workspace) are made again by that function at each
batch size, for the GPU asked for. Where the traces do not line up, there is no line and the callers trace.
A line is a claim about batch sizes that were not traced: ``planning.Estimates`` checks it against every
later trace and bounds where it holds.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Any

import torch

from .engine import ModuleInfo, Trace, trace
from .tracer import StorageRecord
from .options import Options
from .report import RankPeak, Report, build_report
from .targets import target_for


@dataclass(frozen=True)
class Traced:
    """The traces of one estimate: per group of ranks with the same memory, its first rank's (one trace, of
    rank 0, for a single GPU or where every rank holds the same)."""

    eager: torch.nn.Module
    options: Options
    traces: tuple[Trace, ...]
    groups: tuple[tuple[int, ...], ...]

    def report(self) -> Report:
        return assemble(self)


def trace_step(model: torch.nn.Module, eager: torch.nn.Module, options: Options) -> Traced:
    if options.parallel is None:
        return Traced(eager, options, (_spliced_or_traced(model, eager, options),), ((0,),))
    from .parallel import rank_groups

    first = _spliced_or_traced(model, eager, options)
    groups = rank_groups(first.shard_layout, options.parallel, first.rank_keys)
    traces = (first,) + tuple(_spliced_or_traced(model, eager, options, g[0]) for g in groups[1:])
    return Traced(eager, options, traces, tuple(tuple(g) for g in groups))


def _spliced_or_traced(model: torch.nn.Module, eager: torch.nn.Module, options: Options, rank: int = 0) -> Trace:
    """The step (of ``rank``): a deep stack of identical layers spliced from traces of a few of them
    (``depth.splice``, checked against a traced depth); traced whole where the splice does not line up or
    the model cannot run cut (whatever made it fail, the whole trace meets it again and says so)."""
    from . import depth

    stack = depth.find_stack(eager, options) if depth.ENABLED else None
    if stack is not None:
        try:
            return depth.splice(eager, options, stack, shown=model, rank=rank)
        except Exception:
            pass
    return trace(model, options, rank=rank)


def assemble(traced: Traced) -> Report:
    """The report of a traced estimate; for a parallel run, the rank with the largest peak, listing every group."""
    options = traced.options
    reports = [build_report(traced.eager, options, t) for t in traced.traces]
    if options.parallel is None:
        return reports[0]
    from .parallel import describe_ranks

    spec, groups = options.parallel, traced.groups
    ranks = tuple(RankPeak(g, r.peak_bytes) for g, r in zip(groups, reports))
    top = max(range(len(groups)), key=lambda i: (reports[i].peak_bytes, -i))
    if spec.plan is not None:
        code = "plan code"
    elif not spec.shards:
        code = "DistributedDataParallel (its reducer's buckets, gradient copies and buffer broadcasts)"
        code += " and ZeroRedundancyOptimizer" if spec.zero else ""
    else:
        parts = [f"tensor parallel (parallelize_module, with {spec.tp_source})"] if spec.tp > 1 else []
        code = " and ".join(parts + (["FSDP2 (fully_shard)"] if spec.fsdp * spec.replicate > 1 else []))
    about = (f"Rank {groups[top][0]} of {spec.world_size} ({spec.describe()}), traced with PyTorch's own {code} on a "
             "fake process group: collectives complete at once and move no data.")
    if len(groups) > 1:
        why = "different optimizer state (ZeroRedundancyOptimizer's partition)" if spec.zero else \
            "different shards (dimensions that do not divide evenly)"
        about += f" Ranks hold {why}; the rank with the largest peak is shown."
        if any(len(g) > 1 for g in groups):
            about += f" Ranks {describe_ranks(groups)} each hold the same memory."
    if not spec.shards and len(groups) == 1:
        about += " Every rank holds the same memory."
    elif spec.plan is None and spec.fsdp * spec.replicate > 1:
        units = len(spec.units)
        about += (f" fully_shard wraps {units} module{'s' if units != 1 else ''}"
                  + (f" ({spec.units[0]!r}{', ...' if units > 1 else ''})" if units else "") + " and the root.")
    if options.device == "cuda":
        about += " NCCL's own buffers are not counted (max_memory_allocated does not see them)"
        about += ("; the reserved estimate does not model the separate pools of FSDP's all-gather and reduce-scatter "
                  "streams." if spec.shards else ".")
    return replace(reports[top], parallel=spec.describe(), world_size=spec.world_size, rank=groups[top][0],
                   ranks=ranks, notes=(about,) + reports[top].notes)


# ---- the line through two batch sizes -----------------------------------------------------------------

class NoLine(ValueError):
    """The traces at two batch sizes differ in more than sizes affine in the batch; says the first difference."""


def _affine(x0: int, x1: int, b0: int, b1: int, what: str) -> tuple[int, int]:
    """(intercept, slope) of the line through (b0, x0) and (b1, x1), whose slope must be an integer."""
    slope, rest = divmod(x1 - x0, b1 - b0)
    if rest:
        raise NoLine(f"{what} is not affine in the batch with an integer slope ({x0} at {b0}, {x1} at {b1})")
    return x0 - slope * b0, slope


def _tree_line(x0: Any, x1: Any, b0: int, b1: int, what: str):
    """A function of the batch giving ``x0`` at ``b0`` and ``x1`` at ``b1``: integers on their line, tuples
    and lists element by element, anything else (None, bools, strings) equal at both."""
    if isinstance(x0, int) and not isinstance(x0, bool) and type(x1) is type(x0):
        a, s = _affine(x0, x1, b0, b1, what)
        return lambda b: a + s * b
    if isinstance(x0, (tuple, list)) and type(x1) is type(x0):
        _same(len(x0), len(x1), what)
        parts = [_tree_line(e0, e1, b0, b1, what) for e0, e1 in zip(x0, x1)]
        return lambda b: type(x0)(p(b) for p in parts)
    _same(x0, x1, what)
    return lambda b: x0


def _same(a: Any, b: Any, what: str) -> None:
    if a != b:
        raise NoLine(f"{what} differ")


_RECORD_FIELDS = ("birth", "module", "phase", "iteration", "op", "saved", "role", "host")


@dataclass
class _Skeleton:
    """A trace without the allocations rules size by function (``SizedCall``): what must be the same at every
    batch size, with positions counted among what remains."""

    records: list  # the other records, in index order
    rank: dict  # record index -> its position among them
    events: list  # (position, is_alloc) of theirs
    event_ops: list
    phase_starts: list
    calls: list  # (SizedCall, records before it, events before it) among the others


def _skeleton(t: Trace) -> _Skeleton:
    sized = {i for call in t.sized for i in call.made}
    records = [r for r in t.records if r.index not in sized]
    rank = {r.index: k for k, r in enumerate(records)}
    kept = [k for k, (i, _) in enumerate(t.events) if i not in sized]
    before = [0] * (len(t.events) + 1)  # before[p]: events of the skeleton before position p
    for k in kept:
        before[k + 1] = 1
    for p in range(1, len(before)):
        before[p] += before[p - 1]
    indices = [r.index for r in records]
    call_events = [call.event_at for call in t.sized]  # in order: the calls were made one after another
    return _Skeleton(
        records=records, rank=rank,
        events=[(rank[t.events[k][0]], t.events[k][1]) for k in kept],
        event_ops=[t.event_ops[k] for k in kept],
        # a phase starts after the calls made before it, even where no other event lies between them
        phase_starts=[(ph, it, before[p], bisect.bisect_left(call_events, p)) for ph, it, p in t.phase_starts],
        calls=[(call, bisect.bisect_left(indices, call.record_at), before[call.event_at]) for call in t.sized])


class _TraceLine:
    """One trace's line: every record's size, every module's output shape and every phase's FLOPs, and the
    rules' sized allocations, made again at each batch size from their functions."""

    def __init__(self, t0: Trace, t1: Trace, b0: int, b1: int):
        for name in ("op_count", "notes", "assumptions", "shard_layout", "rank_keys", "param_owner"):
            _same(getattr(t0, name), getattr(t1, name), name.replace("_", " "))
        _same(t0.target.name, t1.target.name, "the targets")
        k0, k1 = _skeleton(t0), _skeleton(t1)
        _same(len(k0.records), len(k1.records), "the numbers of allocations")
        for name in ("events", "event_ops", "phase_starts"):
            _same(getattr(k0, name), getattr(k1, name), name.replace("_", " "))
        for table in ("param_records", "grad_records", "state_records"):
            ranks = [{k: [skel.rank.get(r.index) for r in (v if isinstance(v, list) else [v])]
                      for k, v in getattr(t, table).items()} for t, skel in ((t0, k0), (t1, k1))]
            _same(ranks[0], ranks[1], table.replace("_", " "))
        _same(len(k0.calls), len(k1.calls), "the numbers of sized allocations")
        self.calls = []
        for (c0, r0, e0), (c1, r1, e1) in zip(k0.calls, k1.calls):
            _same((c0.sizer, c0.persistent, c0.op_at, c0.context, r0, e0), (c1.sizer, c1.persistent, c1.op_at,
                  c1.context, r1, e1), "the sized allocations")
            self.calls.append((c0, _tree_line(c0.arguments, c1.arguments, b0, b1,
                                              f"the arguments of {getattr(c0.sizer, '__name__', c0.sizer)}"), r0, e0))
        self.sizes = []
        for r0, r1 in zip(k0.records, k1.records):
            for name in _RECORD_FIELDS:
                if getattr(r0, name) != getattr(r1, name):
                    raise NoLine(f"allocation {r0.index} ({r0.op} in {r0.module or 'the root'}) differs in {name}")
            sums = [None if r.sums_into is None else skel.rank.get(r.sums_into) for r, skel in ((r0, k0), (r1, k1))]
            _same(sums[0], sums[1], f"the gradient sums of allocation {r0.index}")
            self.sizes.append(_affine(r0.nbytes, r1.nbytes, b0, b1, f"allocation {r0.index} ({r0.op})"))
        self.shapes = []
        _same(len(t0.modules), len(t1.modules), "the numbers of modules")
        for m0, m1 in zip(t0.modules, t1.modules):
            _same((m0.name, m0.type, m0.depth), (m1.name, m1.type, m1.depth), "the modules")
            s0, s1 = m0.output_shape, m1.output_shape
            if s0 is None or s1 is None or len(s0) != len(s1):
                _same(s0 is None, s1 is None, f"the output of module {m0.name!r}")
                _same(len(s0 or ()), len(s1 or ()), f"the output dimensions of module {m0.name!r}")
                self.shapes.append(None)
            else:
                self.shapes.append(tuple(_affine(d0, d1, b0, b1, f"the output shape of {m0.name!r}")
                                         for d0, d1 in zip(s0, s1)))
        _same(set(t0.flops), set(t1.flops), "the phases with FLOPs")
        self.flops = {k: _affine(t0.flops[k], t1.flops[k], b0, b1, f"the {k.value} FLOPs") for k in t0.flops}
        self.base, self.skeleton = t0, k0

    def at(self, batch: int, target) -> Trace | None:
        """The trace at ``batch`` for ``target``: the skeleton's records sized on their lines, each sized call
        made again where it was, with what its function allocates there, numbered as a trace numbers them."""
        skel, base = self.skeleton, self.base
        sizes = [a + s * batch for a, s in self.sizes]
        if any(n < 0 for n in sizes):
            return None
        made = []  # per call: [(label, bytes)]
        for call, arguments, _, _ in self.calls:
            allocations = call.sizer(target, *arguments(batch))
            if any(n < 0 for _, n in allocations):
                return None
            made.append(allocations)
        # records in creation order: the skeleton's, with each call's at its place
        records, new_index = [], {}
        calls = iter(zip(self.calls, made))
        pending = next(calls, None)
        call_records: list[list] = []

        def flush(upto: int) -> None:
            nonlocal pending
            while pending is not None and pending[0][2] <= upto:
                (call, _, _, _), allocations = pending
                category, module, phase, iteration = call.context
                mine = []
                for label, nbytes in allocations:
                    rec = StorageRecord(index=len(records), nbytes=nbytes, birth=category, module=module,
                                        phase=phase, iteration=iteration, op=label, alloc_event=0)
                    records.append(rec)
                    mine.append(rec.index)
                call_records.append(mine)
                pending = next(calls, None)

        for k, r in enumerate(skel.records):
            flush(k)
            new_index[r.index] = len(records)
            records.append(replace(r, index=len(records), nbytes=sizes[k]))
        flush(len(skel.records))
        for r in records:
            if r.sums_into is not None and r.sums_into in new_index:
                r.sums_into = new_index[r.sums_into]
        # events in order: the skeleton's, with each call's block (allocations, then frees in reverse for
        # scratch) where it was
        position = [new_index[r.index] for r in skel.records]
        events, event_ops = [], []
        blocks = iter(zip(self.calls, call_records))
        block = next(blocks, None)
        for p in range(len(skel.events) + 1):
            while block is not None and block[0][3] <= p:
                (call, _, _, _), mine = block
                for i in mine:
                    events.append((i, True))
                    event_ops.append(call.op_at)
                if not call.persistent:
                    for i in reversed(mine):
                        events.append((i, False))
                        event_ops.append(call.op_at)
                block = next(blocks, None)
            if p < len(skel.events):
                rank, is_alloc = skel.events[p]
                events.append((position[rank], is_alloc))
                event_ops.append(skel.event_ops[p])
        block_sizes = [len(mine) * (1 if call.persistent else 2) for (call, _, _, _), mine in zip(self.calls, call_records)]
        phase_starts = [(ph, it, p + sum(block_sizes[:calls])) for ph, it, p, calls in skel.phase_starts]
        by_old = {old: records[new] for old, new in new_index.items()}
        tables = {name: {k: ([by_old[r.index] for r in v] if isinstance(v, list) else by_old[v.index])
                         for k, v in getattr(base, name).items()}
                  for name in ("param_records", "grad_records", "state_records")}
        modules = [m if line is None else ModuleInfo(m.name, m.type, m.depth, m.params,
                                                     tuple(a + s * batch for a, s in line))
                   for m, line in zip(base.modules, self.shapes)]
        if any(line is not None and min(m.output_shape, default=0) < 0 for m, line in zip(modules, self.shapes)):
            return None
        flops = {k: a + s * batch for k, (a, s) in self.flops.items()}
        sized = []
        for ((call, arguments, _, _), mine) in zip(self.calls, call_records):
            sized.append(replace(call, arguments=arguments(batch), made=tuple(mine)))
        return replace(base, target=target, records=records, events=events, event_ops=event_ops, free_modules=[],
                       phase_starts=phase_starts, modules=modules, flops=flops, sized=tuple(sized), **tables)


class Line:
    """The traces of one step at two batch sizes, lined up; ``NoLine`` says why they do not line up."""

    def __init__(self, a: Traced, batch_a: int, b: Traced, batch_b: int):
        if batch_a == batch_b:
            raise ValueError("a line needs two different batch sizes")
        _same(a.groups, b.groups, "the groups of ranks")
        self.batches = (batch_a, batch_b)
        self.lines = [_TraceLine(t0, t1, batch_a, batch_b) for t0, t1 in zip(a.traces, b.traces)]
        self.eager, self.groups = a.eager, a.groups

    def at(self, batch: int, options: Options) -> Traced | None:
        """The traces at ``batch`` (``options`` made for it) the line gives; None where a size would be
        negative. ``options`` may name another GPU than the traces' where the two make the same choices
        (``gpufit._behaviour``): the rules' sizes that depend on the GPU (a reduction's scratch, the cuBLAS
        workspace) are sized for it."""
        target = target_for(options.device, options.gpu, options.alloc_conf)
        traces = tuple(line.at(batch, target) for line in self.lines)
        if any(t is None for t in traces):
            return None
        return Traced(self.eager, options, traces, self.groups)
