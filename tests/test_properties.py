"""Invariants that hold for every input: checked with hypothesis on small models (few examples each)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memtrace
from memtrace import Category
from memtrace.allocator import SMALL_SIZE, CudaCachingAllocator, round_size

from tiny_models import make_cnn, make_mlp

FEW = settings(max_examples=10, deadline=None)
MiB = 1024 * 1024

MLP = make_mlp()  # report() never modifies the model (test_side_effects.py), so one instance is enough
CNN = make_cnn(channels=4, hw=16)

devices = st.sampled_from(["cpu", "cuda"])
optimizers = st.sampled_from(["sgd", "adam", "adamw", "rmsprop", "adagrad", None])


@FEW
@given(batch=st.integers(1, 16), optimizer=optimizers, device=devices, steps=st.integers(1, 3), train=st.booleans())
def test_categories_sum_to_the_peak(batch, optimizer, device, steps, train):
    r = memtrace.report(MLP, (batch, 4), optimizer=optimizer, device=device, steps=steps, train=train)
    assert set(r.by_category) == set(Category)
    assert all(n >= 0 for n in r.by_category.values())
    assert sum(r.by_category.values()) == r.peak_bytes
    # parameters are live from setup on, so the peak always holds all of them
    assert r.by_category[Category.PARAMETER] == r.layers[0].param_bytes


@FEW
@given(batch=st.integers(1, 16), optimizer=optimizers, device=devices)
def test_timeline_agrees_with_the_peak(batch, optimizer, device):
    r = memtrace.report(MLP, (batch, 4), optimizer=optimizer, device=device)
    tl = r.timeline
    assert len(tl.ops) == len(tl.allocated_bytes) == 2 * len(r.allocations) - sum(
        a.free_event is None for a in r.allocations)
    assert max(tl.allocated_bytes) == r.peak_bytes == tl.allocated_bytes[r.peak.event]
    assert max(span.peak_bytes for span in tl.phases) == r.peak_bytes
    assert list(tl.ops) == sorted(tl.ops)
    # phase spans tile the timeline in order
    assert tl.phases[0].start_event == 0 and tl.phases[-1].end_event == len(tl.allocated_bytes)
    assert all(a.end_event == b.start_event for a, b in zip(tl.phases, tl.phases[1:]))
    # what is left at the end is exactly what was never freed
    assert tl.allocated_bytes[-1] == sum(a.charged_bytes for a in r.allocations if a.free_event is None)


@FEW
@given(b1=st.integers(1, 24), b2=st.integers(1, 24), device=devices, optimizer=st.sampled_from(["sgd", "adam"]))
def test_peak_never_decreases_as_batch_grows(b1, b2, device, optimizer):
    small, big = sorted((b1, b2))
    p_small = memtrace.report(CNN, (small, 3, 16, 16), device=device, optimizer=optimizer).peak_bytes
    p_big = memtrace.report(CNN, (big, 3, 16, 16), device=device, optimizer=optimizer).peak_bytes
    assert p_small <= p_big


@FEW
@given(batch=st.integers(1, 8), optimizer=optimizers, device=devices)
def test_estimating_twice_gives_identical_reports(batch, optimizer, device):
    a = memtrace.report(CNN, (batch, 3, 16, 16), optimizer=optimizer, device=device)
    b = memtrace.report(CNN, (batch, 3, 16, 16), optimizer=optimizer, device=device)
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_estimating_twice_with_amp_gives_identical_reports(device):
    # about 1 run in 3 repeats the first one's order, so 8 runs all agreeing by chance is ~1e-4 likely
    first, *rest = [memtrace.report(MLP, (3, 4), optimizer="sgd", device=device, amp="bf16").to_dict()
                    for _ in range(8)]
    assert all(d == first for d in rest)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-10, 2**40))
def test_rounding_never_shrinks(n):
    r = round_size(n)
    assert r % 512 == 0
    if n <= 0:
        assert r == 0
    else:
        assert n <= r < n + 512
        assert round_size(r) == r


# a random alloc/free program: each step allocates a new block or frees one of the live ones
sizes = st.one_of(st.integers(0, 4096), st.integers(4096, 2 * MiB), st.integers(2 * MiB, 24 * MiB))


@st.composite
def programs(draw):
    events, live, n = [], [], 0
    for _ in range(draw(st.integers(1, 40))):
        if live and draw(st.booleans()):
            i = live.pop(draw(st.integers(0, len(live) - 1)))
            events.append((i, 0, False))
        else:
            events.append((n, draw(sizes), True))
            live.append(n)
            n += 1
    return events


@settings(max_examples=100, deadline=None)
@given(events=programs())
def test_caching_allocator_charges_are_bounded(events):
    charges = CudaCachingAllocator().replay(events)
    requested = {i: n for i, n, is_alloc in events if is_alloc}
    assert set(charges.charged) == set(requested)
    live = 0
    for i, _, is_alloc in events:
        live += charges.charged[i] if is_alloc else -charges.charged[i]
        assert live <= charges.reserved_peak_bytes  # what is allocated lies inside reserved segments
    for i, n in requested.items():
        c, rounded = charges.charged[i], round_size(n)
        assert c % 512 == 0 and c >= rounded >= n
        if rounded <= SMALL_SIZE:
            assert c == rounded  # small blocks always split exactly
        else:
            assert c - rounded <= MiB  # an unsplit large block leaves at most 1 MiB unused
    assert charges.reserved_peak_bytes % (2 * MiB) == 0


@settings(max_examples=100, deadline=None)
@given(events=programs())
def test_expandable_segments_charge_rounded_sizes_inside_what_is_mapped(events):
    charges = CudaCachingAllocator(expandable_segments=True).replay(events)
    live = 0
    for i, n, is_alloc in events:
        if is_alloc:
            assert charges.charged[i] == round_size(n)  # blocks always split exactly
        live += charges.charged[i] if is_alloc else -charges.charged[i]
        assert live <= charges.reserved_peak_bytes
    assert charges.reserved_peak_bytes % (2 * MiB) == 0  # pages are mapped whole
    assert len(charges.segments) <= 2  # one per pool, grown in place
    for seg in charges.segments:
        mapped = sum(m for a, m in charges.mapped.values() if seg.address <= a < seg.address + seg.size)
        assert sum(size for size, _ in seg.blocks) == seg.size == mapped
