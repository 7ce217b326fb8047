"""The CUDA caching-allocator model on hand-made alloc/free sequences.

Events are (record index, requested bytes, is_alloc). The rules under test, from the module docstring
(c10/cuda/CUDACachingAllocator.cpp): requests round up to 512 B; requests <= 1 MiB come from 2 MiB
small-pool segments, larger ones from 20 MiB segments (requests < 10 MiB) or from a segment of the
request rounded up to 2 MiB; a cached block is split if the remainder is >= 512 B (small pool) or
> 1 MiB (large pool), otherwise the whole block is charged; freed blocks merge with free neighbours.
"""

from __future__ import annotations

import pytest

from memtrace.allocator import CudaCachingAllocator, ExactAllocator, cuda_allocator, round_size, segment_size

KiB, MiB = 1024, 1024 * 1024


def replay(*events):
    return CudaCachingAllocator().replay(list(events))


def alloc(i, n):
    return (i, n, True)


def free(i):
    return (i, 0, False)


@pytest.mark.parametrize("n, rounded", [
    (0, 0), (-5, 0), (1, 512), (511, 512), (512, 512), (513, 1024), (1024, 1024), (1025, 1536),
    (MiB, MiB), (MiB + 1, MiB + 512), (10 * MiB - 1, 10 * MiB),
])
def test_round_size(n, rounded):
    assert round_size(n) == rounded


@pytest.mark.parametrize("rounded, segment", [
    (512, 2 * MiB), (MiB, 2 * MiB),  # small pool
    (MiB + 512, 20 * MiB), (10 * MiB - 512, 20 * MiB),  # large pool, under kMinLargeAlloc
    (10 * MiB, 10 * MiB), (11 * MiB, 12 * MiB), (12 * MiB + 512, 14 * MiB),  # rounded up to 2 MiB
])
def test_segment_size(rounded, segment):
    assert segment_size(rounded) == segment


def test_zero_byte_request_is_free_and_takes_no_segment():
    c = replay(alloc(0, 0), free(0))
    assert c.charged == {0: 0}
    assert c.reserved_peak_bytes == 0


def test_small_pool_charges_the_rounded_size():
    # 1 B, 513 B and 1 MiB all fit the first 2 MiB segment: 512 + 1024 + 1 MiB < 2 MiB
    c = replay(alloc(0, 1), alloc(1, 513), alloc(2, MiB))
    assert c.charged == {0: 512, 1: 1024, 2: MiB}
    assert c.reserved_peak_bytes == 2 * MiB


def test_small_pool_opens_a_new_segment_when_full():
    # two 1 MiB blocks fill a 2 MiB segment exactly (remainder 0: no split needed); a third needs another
    c = replay(alloc(0, MiB), alloc(1, MiB), alloc(2, 512))
    assert c.charged == {0: MiB, 1: MiB, 2: 512}
    assert c.reserved_peak_bytes == 4 * MiB


def test_small_block_reused_after_free():
    c = replay(alloc(0, 1000), free(0), alloc(1, 1000))
    assert c.charged == {0: 1024, 1: 1024}
    assert c.reserved_peak_bytes == 2 * MiB


def test_large_pool_splits_when_remainder_is_over_1_mib():
    # 4 MiB from a fresh 20 MiB segment: remainder 16 MiB > 1 MiB -> split, charged 4 MiB
    # 3 MiB from the 16 MiB remainder: remainder 13 MiB -> split, charged 3 MiB
    c = replay(alloc(0, 4 * MiB), alloc(1, 3 * MiB))
    assert c.charged == {0: 4 * MiB, 1: 3 * MiB}
    assert c.reserved_peak_bytes == 20 * MiB


def test_large_pool_charges_the_whole_block_when_remainder_is_at_most_1_mib():
    # A 4 MiB, B 3 MiB (remainder 13 MiB cached); C 12.5 MiB takes the 13 MiB block: remainder
    # 0.5 MiB <= 1 MiB -> not split, C is charged all 13 MiB
    c = replay(alloc(0, 4 * MiB), alloc(1, 3 * MiB), alloc(2, 12 * MiB + 512 * KiB))
    assert c.charged[2] == 13 * MiB
    assert c.reserved_peak_bytes == 20 * MiB


@pytest.mark.parametrize("request_bytes, charged", [
    (19 * MiB, 20 * MiB),  # remainder exactly 1 MiB: not > 1 MiB, so no split
    (19 * MiB - 512, 19 * MiB - 512),  # remainder 1 MiB + 512 B: split
])
def test_large_pool_split_threshold_is_strictly_over_1_mib(request_bytes, charged):
    # a 20 MiB segment is opened by a 1.5 MiB block that is then freed (the whole segment is cached again)
    c = replay(alloc(0, MiB + 512 * KiB), free(0), alloc(1, request_bytes))
    assert c.charged[1] == charged
    assert c.reserved_peak_bytes == 20 * MiB


def test_freed_block_reused_without_split():
    # A 4 MiB | B 16 MiB fill one 20 MiB segment (B: remainder 0). Free A; C 3.5 MiB best-fits A's 4 MiB
    # block with 0.5 MiB left -> charged 4 MiB. D 3.5 MiB finds nothing cached -> a new 20 MiB segment,
    # split, charged 3.5 MiB.
    c = replay(alloc(0, 4 * MiB), alloc(1, 16 * MiB), free(0), alloc(2, 3 * MiB + 512 * KiB),
               alloc(3, 3 * MiB + 512 * KiB))
    assert c.charged == {0: 4 * MiB, 1: 16 * MiB, 2: 4 * MiB, 3: 3 * MiB + 512 * KiB}
    assert c.reserved_peak_bytes == 40 * MiB


def test_free_then_smaller_alloc_splits_merged_block():
    # A 4 MiB from a 20 MiB segment, freed: it merges back with its 16 MiB remainder into 20 MiB;
    # 3.5 MiB from it leaves 16.5 MiB -> split, charged 3.5 MiB, no new segment
    c = replay(alloc(0, 4 * MiB), free(0), alloc(1, 3 * MiB + 512 * KiB))
    assert c.charged[1] == 3 * MiB + 512 * KiB
    assert c.reserved_peak_bytes == 20 * MiB


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_freed_neighbours_merge(order):
    # A 4 MiB | B 4 MiB | C 12 MiB fill a 20 MiB segment. Freeing A and B (either order) leaves one 8 MiB
    # free block; D 7.5 MiB fits only in the merged block (remainder 0.5 MiB: charged 8 MiB, no new segment)
    c = replay(alloc(0, 4 * MiB), alloc(1, 4 * MiB), alloc(2, 12 * MiB), free(order[0]), free(order[1]),
               alloc(3, 7 * MiB + 512 * KiB))
    assert c.charged[3] == 8 * MiB
    assert c.reserved_peak_bytes == 20 * MiB


def test_three_way_merge_restores_the_whole_segment():
    # free A and C first, then B: B merges with both neighbours into the full 20 MiB block
    c = replay(alloc(0, 4 * MiB), alloc(1, 4 * MiB), alloc(2, 12 * MiB), free(0), free(2), free(1),
               alloc(3, 19 * MiB + 512 * KiB))
    assert c.charged[3] == 20 * MiB
    assert c.reserved_peak_bytes == 20 * MiB


def test_no_merge_across_segments():
    # A and B (20 MiB each, >= 10 MiB) get one exact 20 MiB segment each, adjacent in the model's address
    # space. Once both are freed they must stay two 20 MiB blocks: 30 MiB needs a third segment.
    c = replay(alloc(0, 20 * MiB), alloc(1, 20 * MiB), free(0), free(1), alloc(2, 30 * MiB))
    assert c.charged == {0: 20 * MiB, 1: 20 * MiB, 2: 30 * MiB}
    assert c.reserved_peak_bytes == 20 * MiB + 20 * MiB + 30 * MiB


def test_small_and_large_pools_are_separate():
    # a freed 1 MiB small block cannot serve a 1 MiB + 1 B (large) request, and vice versa
    c = replay(alloc(0, MiB), free(0), alloc(1, MiB + 1), free(1), alloc(2, 512))
    assert c.charged == {0: MiB, 1: MiB + 512, 2: 512}
    assert c.reserved_peak_bytes == 2 * MiB + 20 * MiB


@pytest.mark.parametrize("request_bytes, charged, segment", [
    (10 * MiB + 512 * KiB, 10 * MiB + 512 * KiB, 12 * MiB),  # 12 MiB segment, remainder 1.5 MiB: split
    (11 * MiB, 12 * MiB, 12 * MiB),  # 12 MiB segment, remainder 1 MiB: whole segment charged
    (12 * MiB, 12 * MiB, 12 * MiB),
])
def test_big_requests_get_their_own_rounded_segment(request_bytes, charged, segment):
    c = replay(alloc(0, request_bytes))
    assert c.charged[0] == charged
    assert c.reserved_peak_bytes == segment


def test_reserved_peak_counts_cached_segments():
    # the caching allocator never returns segments: reserved only grows
    c = replay(alloc(0, 4 * MiB), alloc(1, 17 * MiB), free(0), free(1), alloc(2, 512))
    # A opens 20 MiB; B (17 MiB >= 10 MiB) cannot fit the 16 MiB remainder -> its own 18 MiB segment
    assert c.charged == {0: 4 * MiB, 1: 18 * MiB, 2: 512}  # 18 MiB - 17 MiB = 1 MiB: not split
    assert c.reserved_peak_bytes == 20 * MiB + 18 * MiB + 2 * MiB


def test_free_of_unknown_index_is_ignored():
    c = replay(free(7), alloc(0, 100), free(0), free(0))
    assert c.charged == {0: 512}


def expandable(*events):
    return CudaCachingAllocator(expandable_segments=True).replay(list(events))


def test_expandable_segments_charge_the_rounded_size():
    c = expandable(alloc(0, 11 * MiB), alloc(1, 1), alloc(2, 0))
    assert c.charged == {0: 11 * MiB, 1: 512, 2: 0}
    # the large pool maps 20 MiB pages, the small pool 2 MiB ones
    assert c.reserved_peak_bytes == 20 * MiB + 2 * MiB


def test_expandable_segments_split_what_the_classic_pool_charges_whole():
    # 19.5 MiB leaves 0.5 MiB of its 20 MiB page: the classic large pool charges the whole block,
    # an expandable segment splits it and a later small-enough large request uses the rest
    assert replay(alloc(0, 19 * MiB + 512 * KiB)).charged == {0: 20 * MiB}
    c = expandable(alloc(0, 19 * MiB + 512 * KiB), alloc(1, 1536 * KiB))
    assert c.charged == {0: 19 * MiB + 512 * KiB, 1: 1536 * KiB}
    assert c.addresses[1] == c.addresses[0] + 19 * MiB + 512 * KiB
    # the 0.5 MiB free at the end is extended by one page, not a new segment
    assert c.reserved_peak_bytes == 40 * MiB
    assert c.mapped == {0: (c.addresses[0], 20 * MiB), 1: (c.addresses[0] + 20 * MiB, 20 * MiB)}


def test_expandable_segment_grows_from_its_free_end():
    # A (12 MiB) and B (6 MiB) fill 18 of the first 20 MiB page; C (30 MiB) fits no free block, so the
    # 2 MiB free at the end is extended by ceil(28 / 20) = 2 pages and C starts where B ended
    c = expandable(alloc(0, 12 * MiB), alloc(1, 6 * MiB), alloc(2, 30 * MiB))
    assert c.addresses[2] == c.addresses[0] + 18 * MiB
    assert c.reserved_peak_bytes == 60 * MiB
    # freeing A leaves a 12 MiB hole that a 10 MiB request reuses without mapping more
    c = expandable(alloc(0, 12 * MiB), alloc(1, 6 * MiB), alloc(2, 30 * MiB), free(0), alloc(3, 10 * MiB))
    assert c.addresses[3] == c.addresses[0] and 3 not in c.mapped
    assert c.reserved_peak_bytes == 60 * MiB


def test_expandable_segment_merges_frees_into_its_end():
    # B at the end is freed and merges with the free rest of the page: the next request extends that
    c = expandable(alloc(0, 4 * MiB), alloc(1, 4 * MiB), free(1), alloc(2, 30 * MiB))
    assert c.addresses[2] == c.addresses[0] + 4 * MiB
    assert c.mapped[2] == (c.addresses[0] + 20 * MiB, 20 * MiB)  # 16 MiB free + 20 MiB mapped >= 30 MiB
    assert c.reserved_peak_bytes == 40 * MiB
    assert [s.size for s in c.segments] == [40 * MiB]


@pytest.mark.parametrize("conf, expandable_, noted", [
    (None, False, None),
    ("expandable_segments:True", True, None),
    ("expandable_segments:False", False, None),
    ("max_split_size_mb:128,expandable_segments:True", True, "max_split_size_mb:128"),
    ("backend:cudaMallocAsync", False, "backend:cudaMallocAsync"),
    ("backend:native, roundup_power2_divisions:4", False, "roundup_power2_divisions:4"),
])
def test_allocator_follows_the_environment(conf, expandable_, noted):
    env = {} if conf is None else {"PYTORCH_CUDA_ALLOC_CONF": conf}
    allocator, notes = cuda_allocator(environ=env)
    assert allocator.expandable_segments is expandable_
    assert (notes == ()) if noted is None else (noted in notes[0] and "PYTORCH_CUDA_ALLOC_CONF" in notes[0])


def test_device_generic_variable_wins():
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    assert cuda_allocator(environ=env)[0].expandable_segments


def test_exact_allocator_charges_requested_bytes():
    c = ExactAllocator().replay([alloc(0, 1), alloc(1, 513), free(0), alloc(2, 0)])
    assert c.charged == {0: 1, 1: 513, 2: 0}
