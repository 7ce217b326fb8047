"""Diagnose a mismatch: which real allocations did the tracer miss (or invent), and which are live at the peak?

Runs one case for real on the CPU under the profiler (the same ``run_steps`` that ``measure_cpu`` runs)
and traces it with ``memtrace.report(device="cpu")``. Each real allocation is either
- internal: freed before the op that made it returns, where "the op" is the outermost ancestor that a
  dispatch mode sees (an aten op without a CompositeImplicitAutograd kernel); such scratch (oneDNN
  buffers, reorders) is invisible to any tracer that watches op outputs; or
- escaping: an op output; the real ops are aligned with the traced ones (difflib over op name and output
  sizes; inside runs that differ, outputs of equal size are paired), and escaping allocations with no
  partner are "missed", traced ones with no partner "extra". The alignment is a heuristic: creation ops
  are spelt differently (the real run clones the model and draws randn inputs) and can leave a little noise.
It prints the measured peak recomputed without internal scratch (if the prediction matches that, the whole
gap is scratch) and what is live at the measured peak per group, since that is what the gap consists of.

    python benchmarks/diagnose.py lstm_lm --optimizer sgd
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from collections import defaultdict

from common import MiB, OPTIMIZERS, quiet_stderr

import torch
from tabulate import tabulate

import memtrace
from memtrace.options import parse_options
from memtrace.step import build_optimizer, run_steps
from models import select


def _real_input(spec):
    if spec.dtype.is_floating_point:
        return torch.randn(spec.shape, dtype=spec.dtype)
    return torch.zeros(spec.shape, dtype=spec.dtype)


_COMPOSITE: dict[str, bool] = {}


def _composite(node) -> bool:
    """Whether the op decomposes above the dispatch mode (CompositeImplicitAutograd), so a tracer sees its parts."""
    name = node.name + (f".{node.overload_name}" if node.overload_name else "")
    if name not in _COMPOSITE:
        try:
            _COMPOSITE[name] = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
        except RuntimeError:
            _COMPOSITE[name] = False
    return _COMPOSITE[name]


def _ancestors(node) -> list:
    out = []
    p = node.parent
    while p is not None:
        out.append(p)
        p = p.parent
    out.reverse()  # outermost first
    return out


def _chain(ancestors, depth: int = 3) -> str:
    """The op a dispatch mode sees, then the innermost ``depth`` ops around the allocation."""
    names = [a.name for a in ancestors]
    if not names:
        return "(no op)"
    visible = _visible_op(ancestors)
    inner = " > ".join(names[-depth:])
    if visible is None or visible.name in names[-depth:]:
        return inner
    return f"{visible.name}: ... > {inner}"


def _visible_op(ancestors):
    """The outermost aten op a dispatch mode would see around this allocation, or None."""
    for a in ancestors:
        if a.name.startswith("aten::") and not _composite(a):
            return a
    return None


def profile_real(model, kwargs) -> list[dict]:
    """Allocation events of the real run, in time order: dicts with t, size (negative: free), ptr, chain."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    options = parse_options(model, **{**kwargs, "device": "cpu"})
    torch.manual_seed(0)
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        real = copy.deepcopy(model)
        real.train(True)
        optimizer = build_optimizer(options, list(real.parameters()))
        run_steps(real, options, lambda: options.inputs.build(_real_input), optimizer, None, "cpu")
        del real, optimizer
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    events = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            anc = _ancestors(node)
            op = _visible_op(anc)
            events.append({"t": node.start_time_ns, "size": f.alloc_size, "ptr": f.ptr, "chain": _chain(anc),
                           "op": op.name if op is not None else "(none)",
                           "op_key": (op.start_time_ns, op.name) if op is not None else (node.start_time_ns, "(none)"),
                           "op_end": op.end_time_ns if op is not None else None})
        stack.extend(node.children)
    events.sort(key=lambda e: e["t"])
    return events


def real_allocations(events: list[dict]):
    """Pair frees with allocations by pointer; returns (allocs with alloc/free positions, peak position, peak)."""
    live: dict[int, dict] = {}
    allocs = []
    total = peak = 0
    peak_pos = 0
    for pos, e in enumerate(events):
        total += e["size"]
        if e["size"] > 0:
            a = {"size": e["size"], "chain": e["chain"], "op": e["op"], "op_key": e["op_key"],
                 "op_end": e["op_end"], "alloc": pos,
                 "free": None, "internal": False}
            live[e["ptr"]] = a
            allocs.append(a)
        elif e["size"] < 0:
            a = live.pop(e["ptr"], None)
            if a is not None:
                a["free"] = pos
                a["internal"] = a["op_end"] is not None and e["t"] <= a["op_end"]
        if total > peak:
            peak, peak_pos = total, pos
    return allocs, peak_pos, peak


# ops that only make a new tensor: the real run's model copy clones where the tracer makes empty_strided,
# real inputs are randn/zeros where the tracer's are empty
_NEW_TENSOR = {"aten::clone", "aten::empty_strided", "aten::empty", "aten::randn", "aten::zeros", "aten::ones",
               "aten::empty_like", "aten::zeros_like", "aten::ones_like", "aten::full", "aten::new_empty",
               "aten::new_zeros", "aten::scalar_tensor", "aten::lift_fresh", "(none)"}


def _base(op: str) -> str:
    """'aten.convolution_backward.default' -> 'aten::convolution_backward' (the profiler's spelling)."""
    parts = op.split(".")
    name = f"{parts[0]}::{parts[1]}" if len(parts) >= 2 and "::" not in op else op
    return "(new tensor)" if name in _NEW_TENSOR else name


def align_by_op(escaping: list[dict], traced: list, timeline_ops) -> tuple[list[dict], list]:
    """Align the real ops that allocate with the traced ones (by name, in order), then compare the sizes of
    their outputs: real outputs without a traced partner are missed, traced ones without a real one extra."""
    real_ops: dict = defaultdict(list)
    for a in escaping:
        real_ops[a["op_key"]].append(a)
    real_seq = sorted(real_ops)
    traced_ops: dict = defaultdict(list)
    for a in traced:
        traced_ops[timeline_ops[a.alloc_event]].append(a)
    traced_seq = sorted(traced_ops)
    # an op matches when its name and the sizes of its outputs match; unmatched runs are then compared
    # output by output in order, so an op whose outputs differ in size shows up as missed/extra bytes
    real_keys = [(_base(k[1]), tuple(sorted(a["size"] for a in real_ops[k]))) for k in real_seq]
    traced_keys = [(_base(traced_ops[k][0].op), tuple(sorted(a.requested_bytes for a in traced_ops[k])))
                   for k in traced_seq]
    sm = difflib.SequenceMatcher(None, real_keys, traced_keys, autojunk=False)
    missed, extra = [], []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        # in a run of ops that differ (names spelled differently, ops split differently), outputs of equal
        # size on both sides are taken to be the same tensor
        reals = [a for rk in real_seq[i1:i2] for a in real_ops[rk]]
        pool: dict[int, list] = defaultdict(list)
        for tk in traced_seq[j1:j2]:
            for t in traced_ops[tk]:
                pool[t.requested_bytes].append(t)
        for a in reals:
            if pool.get(a["size"]):
                pool[a["size"]].pop(0)
            else:
                missed.append(a)
        extra.extend(t for ts in pool.values() for t in ts)
    return missed, extra


def group(items, key, size="size") -> list[list]:
    agg: dict = defaultdict(lambda: [0, 0, 0])
    for it in items:
        g = agg[key(it)]
        g[0] += 1
        g[1] += it[size]
        g[2] = max(g[2], it[size])
    rows = sorted(([k, n, total / MiB, biggest / MiB] for k, (n, total, biggest) in agg.items()),
                  key=lambda r: -r[2])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case")
    ap.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS))
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    (case,) = select(args.case)
    optimizer, optimizer_kwargs = OPTIMIZERS[args.optimizer]
    kwargs = dict(case.report_kwargs(), optimizer=optimizer, optimizer_kwargs=optimizer_kwargs)
    torch.manual_seed(0)
    with quiet_stderr():
        model = case.factory()

    rep = memtrace.report(model, **kwargs, device="cpu")
    traced = sorted(rep.allocations, key=lambda a: a.alloc_event)
    events = profile_real(model, kwargs)
    real, peak_pos, peak = real_allocations(events)
    print(f"{case.name}/{args.optimizer}: predicted {rep.peak_bytes / MiB:.2f} MiB, measured {peak / MiB:.2f} MiB "
          f"(error {(rep.peak_bytes - peak) / peak * 100:+.3f}%); {len(real)} real allocations, "
          f"{len(traced)} traced; measured peak inside: {events[peak_pos]['chain']}")

    internal = [a for a in real if a["internal"]]
    escaping = [a for a in real if not a["internal"] and a["size"] > 0]
    missed, extra = align_by_op(escaping, [a for a in traced if a.requested_bytes > 0], rep.timeline.ops)
    total = peak_wo = 0
    curve = [0] * (len(events) + 1)
    for a in real:
        if not a["internal"]:
            curve[a["alloc"]] += a["size"]
            if a["free"] is not None:
                curve[a["free"]] -= a["size"]
    for d in curve:
        total += d
        peak_wo = max(peak_wo, total)
    print(f"real allocations: {len(internal)} internal to an op ({sum(a['size'] for a in internal) / MiB:.2f} MiB "
          f"in all), {len(escaping)} escaping; escaping but missed by the tracer: {len(missed)} "
          f"({sum(a['size'] for a in missed) / MiB:.2f} MiB); extra in the trace: {len(extra)} "
          f"({sum(a.requested_bytes for a in extra) / MiB:.2f} MiB)")
    print(f"measured peak without op-internal scratch: {peak_wo / MiB:.2f} MiB "
          f"(prediction {(rep.peak_bytes - peak_wo) / max(peak_wo, 1) * 100:+.3f}% from it)")

    def live_at_peak(a):
        return a["alloc"] <= peak_pos and (a["free"] is None or a["free"] > peak_pos)

    headers = ["parent ops (outer > inner)", "count", "MiB", "largest MiB"]
    print(f"\ngap to explain (measured - predicted): {(peak - rep.peak_bytes) / MiB:.3f} MiB")
    for label, items in (("internal scratch", internal), ("missed op outputs", missed)):
        live = [a for a in items if live_at_peak(a)]
        print(f"\n{label} live at the measured peak: {len(live)}, {sum(a['size'] for a in live) / MiB:.3f} MiB")
        if live:
            print(tabulate(group(live, lambda a: a["chain"])[: args.top], headers=headers, floatfmt=".3f"))
    print("\nall internal scratch, by the op that made it:")
    print(tabulate(group(internal, lambda a: a["op"])[: args.top], headers=["op", "count", "MiB", "largest MiB"],
                   floatfmt=".3f"))
    if missed:
        print("\nall missed op outputs, by parent ops:")
        print(tabulate(group(missed, lambda a: a["chain"])[: args.top], headers=headers, floatfmt=".3f"))
    if extra:
        print("\nextra allocations in the trace (no real partner), by op, module and phase:")
        rows = group([{"size": a.requested_bytes, "k": (a.op, a.module, a.phase.value)} for a in extra],
                     lambda a: " | ".join(a["k"]))
        print(tabulate(rows[: args.top], headers=["op | module | phase", "count", "MiB", "largest MiB"],
                       floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
