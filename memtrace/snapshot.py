"""The predicted step as a CUDA memory snapshot: the pickle ``torch.cuda.memory._snapshot()`` writes.

PyTorch's memory viewer (pytorch.org/memory_viz, ``torch.cuda._memory_viz``) reads it, so a prediction
opens in the same viewer as a real snapshot, side by side. The format (torch/csrc/cuda/memory_snapshot.cpp):
``device_traces`` holds, per device, the allocator's actions in order (``segment_alloc`` when a segment is
reserved, ``alloc``, and ``free_requested`` followed by ``free_completed``), each with ``addr``, ``size``,
``stream`` and ``frames``; ``segments`` holds every segment as the trace leaves it, with its blocks. As in a
real snapshot, a trace entry's ``size`` is the requested size (CUDACachingAllocator.cpp records
``orig_size``) while a block's ``size`` is what the allocator charged, so the viewer's timeline plots
requested bytes and its segment view shows the rounding.

CUDA reports: addresses and segments come from replaying the report's alloc/free sequence through the
caching-allocator model that produced its charges (checked to give the same charge for every
allocation); nothing is ever returned to the device, as the caching allocator keeps its segments.
CPU reports: the exact allocator has no address space, so one is synthesised: every allocation is its own
segment at a fresh address, reserved when it is allocated and released when it is freed, which is what
charging each storage on its own means. Zero-byte allocations take no memory and leave no entry, as in
the real allocator.

Each entry's ``frames`` carry what memtrace knows in place of a stack: the category, module and op of the
allocation, and the iteration and phase of the step it was made in.
"""

from __future__ import annotations

import pickle
from os import PathLike

from .allocator import CudaCachingAllocator, ExactAllocator, Segment

BASE_ADDRESS = 0x7F0000000000  # where a process's device allocations typically start; any value works
CPU_ALIGNMENT = 64  # the CPU allocator's alignment (c10::alignment), for the synthesised addresses
PICKLE_PROTOCOL = 4  # the viewer's own unpickler reads protocols 2 to 4


def save_snapshot(report, path: str | PathLike) -> None:
    """Write ``snapshot(report)`` to ``path`` as the pickle ``torch.cuda.memory._dump_snapshot`` writes."""
    data = snapshot(report)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=PICKLE_PROTOCOL)


def snapshot(report) -> dict:
    """The predicted allocations of ``report`` as a ``torch.cuda.memory._snapshot()`` dictionary."""
    events = _events(report)
    if report.allocator in (CudaCachingAllocator.name, CudaCachingAllocator.EXPANDABLE_NAME):
        return _cuda_snapshot(report, events, report.allocator == CudaCachingAllocator.EXPANDABLE_NAME)
    if report.allocator == ExactAllocator.name:
        return _exact_snapshot(events)
    raise ValueError(f"no snapshot for the {report.allocator!r} allocator model: it has no address space")


def frames(allocation) -> list[dict]:
    """What memtrace knows of where an allocation comes from, as the viewer's stack frames (innermost first)."""
    module = allocation.module
    where = f"in the {module[1:-1]}" if module.startswith("(") else f"in {module}" if module else "in the root module"
    what = f"{allocation.category.value.replace('_', ' ')} {where} ({allocation.op})"
    return [
        {"filename": "memtrace", "line": 0, "name": what},
        {"filename": "memtrace", "line": 0, "name": f"iteration {allocation.iteration}, {allocation.phase.value}"},
    ]


def _events(report) -> list[tuple]:
    """The report's device timeline as (allocation, is_alloc), one per position."""
    events: list = [None] * len(report.timeline.allocated_bytes)
    for a in report.allocations:
        events[a.alloc_event] = (a, True)
        if a.free_event is not None:
            events[a.free_event] = (a, False)
    if any(e is None for e in events):
        raise ValueError("the report's allocations do not account for every event of its timeline")
    return events


def _entry(action: str, addr: int, size: int, frames_: list) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": frames_}


def _cuda_snapshot(report, events, expandable: bool) -> dict:
    charges = CudaCachingAllocator(expandable).replay([(a.index, a.requested_bytes, is_alloc) for a, is_alloc in events])
    by_index = {a.index: a for a in report.allocations}
    if any(charges.charged[i] != a.charged_bytes for i, a in by_index.items()):
        raise ValueError("the caching-allocator model no longer charges this report's allocations as it did; "
                         "estimate the step again")
    opened: dict[int, Segment] = {s.opened_by: s for s in charges.segments}
    trace, frames_of = [], _frames_cache()
    for a, is_alloc in events:
        if a.index not in charges.addresses:  # zero bytes: no block
            continue
        addr, f = BASE_ADDRESS + charges.addresses[a.index], frames_of(a)
        if is_alloc:
            seg = opened.get(a.index)
            if a.index in charges.mapped:  # expandable segments grow by mapping pages
                start, size = charges.mapped[a.index]
                trace.append(_entry("segment_map", BASE_ADDRESS + start, size, f))
            elif seg is not None:
                trace.append(_entry("segment_alloc", BASE_ADDRESS + seg.address, seg.size, f))
            trace.append(_entry("alloc", addr, a.requested_bytes, f))
        else:
            trace.append(_entry("free_requested", addr, a.requested_bytes, f))
            trace.append(_entry("free_completed", addr, a.requested_bytes, f))
    segments = [_segment(s, by_index, frames_of, expandable) for s in charges.segments]
    return {"segments": segments, "device_traces": [trace]}


def _frames_cache():
    """``frames`` once per allocation: its entries share one list, which the pickle then stores once."""
    cache: dict[int, list] = {}

    def frames_of(a) -> list:
        if a.index not in cache:
            cache[a.index] = frames(a)
        return cache[a.index]

    return frames_of


def _segment(seg: Segment, by_index, frames_of, expandable: bool = False) -> dict:
    blocks, address = [], BASE_ADDRESS + seg.address
    for size, index in seg.blocks:
        a = None if index is None else by_index[index]
        blocks.append({
            "address": address, "size": size, "requested_size": 0 if a is None else a.requested_bytes,
            "state": "inactive" if a is None else "active_allocated", "frames": [] if a is None else frames_of(a),
        })
        address += size
    return _segment_dict(BASE_ADDRESS + seg.address, seg.size, "small" if seg.small else "large",
                         frames_of(by_index[seg.opened_by]), blocks, expandable)


def _segment_dict(address: int, size: int, kind: str, frames_: list, blocks: list, expandable: bool = False) -> dict:
    active = [b for b in blocks if b["state"] == "active_allocated"]
    return {
        "device": 0, "address": address, "total_size": size,
        "allocated_size": sum(b["size"] for b in active), "active_size": sum(b["size"] for b in active),
        "requested_size": sum(b["requested_size"] for b in active), "stream": 0, "segment_type": kind,
        "segment_pool_id": (0, 0), "is_expandable": expandable, "frames": frames_, "blocks": blocks,
    }


def _exact_snapshot(events) -> dict:
    trace, live, next_addr, frames_of = [], {}, BASE_ADDRESS, _frames_cache()
    for a, is_alloc in events:
        if not a.charged_bytes:
            continue
        f = frames_of(a)
        if is_alloc:
            addr = live[a.index] = next_addr
            next_addr += -(-a.charged_bytes // CPU_ALIGNMENT) * CPU_ALIGNMENT
            trace.append(_entry("segment_alloc", addr, a.charged_bytes, f))
            trace.append(_entry("alloc", addr, a.requested_bytes, f))
        else:
            addr = live.pop(a.index)
            trace.append(_entry("free_requested", addr, a.requested_bytes, f))
            trace.append(_entry("free_completed", addr, a.requested_bytes, f))
            trace.append(_entry("segment_free", addr, a.charged_bytes, f))
    by_index = {a.index: a for a, is_alloc in events if is_alloc}
    segments = []
    for index, addr in live.items():
        a = by_index[index]
        block = {"address": addr, "size": a.charged_bytes, "requested_size": a.requested_bytes,
                 "state": "active_allocated", "frames": frames_of(a)}
        segments.append(_segment_dict(addr, a.charged_bytes, "large", frames_of(a), [block]))
    return {"segments": segments, "device_traces": [trace]}
