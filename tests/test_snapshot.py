"""The predicted step as a memory snapshot: what PyTorch's viewer reads, and that it tells the report's story.

The trace is replayed here the way the viewer replays it (torch/utils/viz/MemoryViz.js): an address is
live from its ``alloc`` to its ``free_completed``, a segment from its ``segment_alloc`` to its
``segment_free``, and the ``segments`` list is the state the trace ends in.
"""

from __future__ import annotations

import dataclasses
import pickle
import pickletools

import pytest
import torch.cuda._memory_viz as memory_viz
from hypothesis import given, settings
from hypothesis import strategies as st

import memtrace
from memtrace.allocator import CudaCachingAllocator, Segment
from memtrace.snapshot import snapshot

from tiny_models import make_cnn, tiny_gpt2, token_batch

KiB, MiB = 1024, 1024 * 1024

# Every opcode the viewer's own unpickler (MemoryViz.js, unpickle()) reads; it accepts protocols 2 to 4.
VIEWER_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "EMPTY_DICT",
    "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE",
    "NONE", "NEWTRUE", "NEWFALSE",
}


@pytest.fixture(scope="module", params=["cuda", "cpu"])
def report(request):
    return memtrace.report(make_cnn(), (4, 3, 32, 32), optimizer="adam", device=request.param)


@pytest.fixture(scope="module")
def saved(report, tmp_path_factory):
    path = tmp_path_factory.mktemp("snapshot") / "step.pickle"
    report.save_snapshot(path)
    return path


def replay(trace):
    """Walk the trace as the viewer does; return the live requested bytes after each alloc or free, and the
    live allocations and segments at the end. Fails on an overlap or an allocation outside a segment."""
    live: dict[int, int] = {}
    segments: dict[int, int] = {}
    after = []
    for e in trace:
        action, addr, size = e["action"], e["addr"], e["size"]
        if action == "segment_alloc":
            assert all(addr >= a + n or addr + size <= a for a, n in segments.items()), "segments overlap"
            segments[addr] = size
        elif action == "segment_map":  # an expandable segment grows at its end
            grown = next((a for a, n in segments.items() if a + n == addr), None)
            assert all(addr >= a + n or addr + size <= a for a, n in segments.items()), "segments overlap"
            if grown is None:
                segments[addr] = size
            else:
                segments[grown] += size
        elif action == "segment_free":
            assert segments.pop(addr) == size
            assert not any(addr <= a < addr + size for a in live), "segment released with live blocks"
        elif action == "alloc":
            assert addr not in live
            assert any(a <= addr and addr + size <= a + n for a, n in segments.items()), "block outside segments"
            assert all(addr >= a + n or addr + size <= a for a, n in live.items()), "live blocks overlap"
            live[addr] = size
            after.append(sum(live.values()))
        elif action == "free_requested":
            assert live[addr] == size
        elif action == "free_completed":
            assert live.pop(addr) == size
            after.append(sum(live.values()))
        else:
            raise AssertionError(f"unexpected action {action!r}")
    return after, live, segments


def test_the_file_is_a_snapshot_pickle_the_viewer_can_read(saved):
    raw = saved.read_bytes()
    opcodes = {op.name for op, _, _ in pickletools.genops(raw)}
    assert opcodes <= VIEWER_OPCODES, opcodes - VIEWER_OPCODES
    data = pickle.loads(raw)
    assert set(data) == {"segments", "device_traces"}
    (trace,) = data["device_traces"]
    assert {e["action"] for e in trace} >= {"segment_alloc", "alloc", "free_requested", "free_completed"}
    for e in trace:
        assert set(e) == {"action", "addr", "size", "stream", "frames"}
        assert all(set(f) == {"filename", "line", "name"} for f in e["frames"])
    for seg in data["segments"]:
        assert {"device", "address", "total_size", "allocated_size", "active_size", "requested_size", "stream",
                "segment_type", "segment_pool_id", "is_expandable", "frames", "blocks"} <= set(seg)
        assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]


def test_torch_memory_viz_reads_it(saved, capsys):
    data = pickle.loads(saved.read_bytes())
    stats = memory_viz.segsum(data)  # asserts that blocks account for every reserved byte
    assert f"segments: {len(data['segments'])}" in stats
    text = memory_viz.trace(data)
    assert f"{len(data['device_traces'][0])} entries" in text
    lines = memory_viz.memory(data, format_flamegraph=lambda lines: lines)
    assert "memtrace:0:parameters" in lines
    assert memory_viz.segments(data, format_flamegraph=lambda lines: lines)
    memory_viz.compare(data["segments"], data["segments"], format_flamegraph=lambda lines: lines)
    assert "only_before = []" in capsys.readouterr().out
    for html in (memory_viz.trace_plot(data), memory_viz.trace_plot(data, plot_segments=True),
                 memory_viz.segment_plot(data)):
        assert "MemoryViz.js" in html and len(html) > len(saved.read_bytes())


def test_the_trace_replays_the_report(report):
    data = snapshot(report)
    after, live, segments = replay(data["device_traces"][0])
    # one alloc or free_completed per event of the timeline; zero-byte allocations leave none
    nonzero = [pos for pos in range(len(report.timeline.allocated_bytes))
               if next(a for a in report.allocations if pos in (a.alloc_event, a.free_event)).requested_bytes]
    assert len(after) == len(nonzero)
    at = nonzero.index(report.peak.event)
    live_at_peak = [a for a in report.allocations
                    if a.alloc_event <= report.peak.event and (a.free_event is None or a.free_event > report.peak.event)]
    assert after[at] == sum(a.requested_bytes for a in live_at_peak)
    if report.allocator == "exact":
        assert after[at] == report.peak_bytes  # the exact allocator charges what was requested
    # the end state: the segments' active blocks are what the trace leaves live
    blocks = {b["address"]: b for seg in data["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"}
    assert {a: b["requested_size"] for a, b in blocks.items()} == live
    still_live = [a for a in report.allocations if a.free_event is None and a.requested_bytes]
    assert sum(b["size"] for b in blocks.values()) == sum(a.charged_bytes for a in still_live)
    assert {seg["address"]: seg["total_size"] for seg in data["segments"]} == segments


def test_cuda_segments_are_the_allocator_models(report):
    if report.allocator == "exact":
        pytest.skip("the CPU target has no segments of its own")
    data = snapshot(report)
    assert report.reserved_peak_bytes == sum(seg["total_size"] for seg in data["segments"])
    assert {seg["segment_type"] for seg in data["segments"]} <= {"small", "large"}
    for seg in data["segments"]:
        assert seg["total_size"] % (2 * MiB) == 0


def test_frames_name_the_category_module_and_op(report):
    data = snapshot(report)
    allocs = [e for e in data["device_traces"][0] if e["action"] == "alloc"]
    names = {e["frames"][0]["name"] for e in allocs}
    conv = next(a for a in report.allocations if a.op == "aten.convolution.default" and a.iteration == 0)
    assert f"{conv.category.value} in {conv.module} (aten.convolution.default)" in names
    assert any(n.startswith("parameters in the setup") for n in names)
    assert {e["frames"][1]["name"] for e in allocs} >= {"iteration 0, forward", "iteration 1, backward"}


def test_a_language_model_round_trips(tmp_path):
    r = memtrace.report(tiny_gpt2(), inputs=token_batch(), optimizer="adamw")
    r.save_snapshot(tmp_path / "gpt2.pickle")
    data = pickle.loads((tmp_path / "gpt2.pickle").read_bytes())
    replay(data["device_traces"][0])
    memory_viz.segsum(data)


def test_a_report_the_allocator_model_no_longer_explains_is_refused(report):
    if report.allocator == "exact":
        pytest.skip("only the caching-allocator snapshot is replayed through the model")
    a = next(a for a in report.allocations if a.requested_bytes)
    changed = tuple(dataclasses.replace(x, charged_bytes=x.charged_bytes + 512) if x is a else x
                    for x in report.allocations)
    with pytest.raises(ValueError, match="no longer charges"):
        snapshot(dataclasses.replace(report, allocations=changed))
    with pytest.raises(ValueError, match="no snapshot for the 'other' allocator"):
        snapshot(dataclasses.replace(report, allocator="other"))


# The allocator model's addresses and segments on a hand-made sequence.
def test_addresses_and_segments_of_a_small_pool_sequence():
    # 1000 B -> 1024 B blocks carved from one 2 MiB small-pool segment reserved by record 0
    charges = CudaCachingAllocator().replay([(0, 1000, True), (1, 1000, True), (0, 0, False), (2, 512, True)])
    # record 2 (512 B) best-fits the freed 1024 B block at 0 and splits it (remainder 512 B >= 512 B)
    assert charges.addresses == {0: 0, 1: 1024, 2: 0}
    assert charges.charged == {0: 1024, 1: 1024, 2: 512}
    assert charges.segments == [Segment(0, 2 * MiB, True, 0, ((512, 2), (512, None), (1024, 1), (2 * MiB - 2048, None)))]


def test_a_large_request_gets_its_own_segment_after_the_small_one():
    charges = CudaCachingAllocator().replay([(0, 100, True), (1, 12 * MiB, True), (1, 0, False)])
    assert charges.addresses == {0: 0, 1: 2 * MiB}
    # freed, the 12 MiB block merges back into nothing smaller: the segment is one free block again
    assert charges.segments[1] == Segment(2 * MiB, 12 * MiB, False, 1, ((12 * MiB, None),))


@pytest.mark.parametrize("expandable", [False, True], ids=["segments", "expandable"])
@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 24 * MiB), st.integers(0, 50)), max_size=80))
def test_live_blocks_never_overlap_and_stay_in_their_segments(expandable, steps):
    sequence, live = [], []
    for k, (alloc, size, pick) in enumerate(steps):
        if alloc or not live:
            sequence.append((k, size, True))
            live.append(k)
        else:
            sequence.append((live.pop(pick % len(live)), 0, False))
    model = CudaCachingAllocator(expandable_segments=expandable)
    charges = model.replay(sequence)
    for n in range(len(sequence) + 1):  # every prefix: the state after each event
        prefix = model.replay(sequence[:n])
        held = {i: (prefix.addresses[i], prefix.charged[i]) for i, _, is_alloc in sequence[:n] if is_alloc}
        for i, _, is_alloc in sequence[:n]:
            if not is_alloc:
                held.pop(i)
        spans = sorted(held.values())
        assert all(a + s <= b for (a, s), (b, _) in zip(spans, spans[1:]))
        segs = [(s.address, s.size) for s in prefix.segments]
        assert all(any(sa <= a and a + s <= sa + ss for sa, ss in segs) for a, s in spans)
    for seg in charges.segments:
        assert sum(size for size, _ in seg.blocks) == seg.size


def test_expandable_segments_from_the_environment(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    r = memtrace.report(make_cnn(), (4, 3, 32, 32), optimizer="adam", device="cuda")
    assert r.allocator == CudaCachingAllocator.EXPANDABLE_NAME
    assert all(a.charged_bytes == -(-a.requested_bytes // 512) * 512 for a in r.allocations)
    data = snapshot(r)
    after, live, segments = replay(data["device_traces"][0])
    assert {e["action"] for e in data["device_traces"][0]} >= {"segment_map", "alloc"}
    assert all(seg["is_expandable"] for seg in data["segments"])
    assert r.reserved_peak_bytes == sum(segments.values()) == sum(seg["total_size"] for seg in data["segments"])
    assert len(data["segments"]) <= 2  # one per pool, grown in place
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    classic = memtrace.report(make_cnn(), (4, 3, 32, 32), optimizer="adam", device="cuda")
    assert classic.allocator == "cuda-caching" and classic.peak_bytes >= r.peak_bytes


def test_alloc_conf_argument_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    classic = memtrace.report(make_cnn(), (4, 3, 32, 32), optimizer="adam", alloc_conf="")
    assert classic.allocator == "cuda-caching" and classic.settings["alloc_conf"] == ""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    r = memtrace.report(make_cnn(), (4, 3, 32, 32), optimizer="adam",
                        alloc_conf="expandable_segments:True,max_split_size_mb:64")
    assert r.allocator == CudaCachingAllocator.EXPANDABLE_NAME
    assert any(n.startswith("alloc_conf sets max_split_size_mb:64") for n in r.notes)
    table = memtrace.compare(make_cnn(), input_shape=(4, 3, 32, 32), optimizer="adam",
                             variants=["fp32", ("expandable", {"alloc_conf": "expandable_segments:True"})])
    assert table.rows[1].peak_bytes == memtrace.report(make_cnn(), (4, 3, 32, 32), optimizer="adam",
                                                       alloc_conf="expandable_segments:True").peak_bytes
    with pytest.raises(ValueError, match="sets the CUDA caching allocator"):
        memtrace.report(make_cnn(), (4, 3, 32, 32), device="cpu", alloc_conf="expandable_segments:True")
    with pytest.raises(TypeError, match="must be a string"):
        memtrace.report(make_cnn(), (4, 3, 32, 32), alloc_conf=True)
    with pytest.raises(ValueError, match="PYTORCH_CUDA_ALLOC_CONF before CUDA starts"):
        memtrace.report(make_cnn(), (4, 3, 32, 32), alloc_conf="expandable_segments:True", verify=True)
