"""Allocator models: what each allocation is charged on the target device.

``ExactAllocator`` charges the storage's bytes, as the CPU allocator reports them to the profiler.
``CudaCachingAllocator`` replays the alloc/free sequence through a model of PyTorch's CUDA caching
allocator (c10/cuda/CUDACachingAllocator.cpp): requests rounded up to 512 B; a small pool (<= 1 MiB)
carved from 2 MiB segments and a large pool carved from 20 MiB segments (requests under 10 MiB) or
segments of the request rounded up to 2 MiB; best-fit by (size, address); a cached block is split only
if the remainder is >= 512 B (small pool) or > 1 MiB (large pool), otherwise the whole block is charged
to ``allocated_bytes``; freed blocks merge with free neighbours and stay cached.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

KiB, MiB = 1024, 1024 * 1024
MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = MiB  # kSmallSize: largest request served from the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small-pool segment
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: large-pool segment for requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
ROUND_LARGE = 2 * MiB  # kRoundLarge


def round_size(nbytes: int) -> int:
    """The caching allocator's request rounding (``round_size``); zero-byte requests take nothing."""
    if nbytes <= 0:
        return 0
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(rounded: int) -> int:
    """``get_allocation_size``: the size of the segment cudaMalloc'd when no cached block fits."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-rounded // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    ptr: int
    size: int
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None


@dataclass(frozen=True)
class Segment:
    """One cudaMalloc'd segment of the caching-allocator model, with its blocks as the sequence left them."""

    address: int
    size: int
    small: bool  # small pool (2 MiB segments) or large pool
    opened_by: int  # record index of the allocation that made the allocator reserve it
    blocks: tuple[tuple[int, int | None], ...]  # (bytes, record index or None when free), in address order


@dataclass
class Charges:
    """What the allocator model made of one alloc/free sequence."""

    charged: dict[int, int]  # record index -> bytes charged to allocated_bytes
    reserved_peak_bytes: int = 0
    addresses: dict[int, int] = field(default_factory=dict)  # record index -> block address (caching model)
    segments: list[Segment] = field(default_factory=list)  # in the order they were reserved


class ExactAllocator:
    name = "exact"

    def replay(self, sequence) -> Charges:
        return Charges({i: n for i, n, is_alloc in sequence if is_alloc})


@dataclass
class CudaCachingAllocator:
    """Replays (record index, bytes, is_alloc) events; ``expandable_segments`` charges rounded sizes."""

    expandable_segments: bool = False
    name: str = field(default="cuda-caching", init=False)

    def replay(self, sequence) -> Charges:
        pools: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}
        blocks: dict[int, _Block] = {}
        charged: dict[int, int] = {}
        addresses: dict[int, int] = {}
        heads: list[tuple[_Block, int]] = []  # each segment's first block, and the record that reserved it
        next_ptr = 0
        reserved = reserved_peak = 0
        for index, nbytes, is_alloc in sequence:
            if not is_alloc:
                block = blocks.pop(index, None)
                if block is not None:
                    self._free(block, pools[block.small])
                continue
            size = round_size(nbytes)
            if size == 0:
                charged[index] = 0
                continue
            if self.expandable_segments:
                charged[index] = size
                continue
            small = size <= SMALL_SIZE
            pool = pools[small]
            pos = bisect.bisect_left(pool, (size, -1))
            if pos < len(pool):
                block = pool.pop(pos)[2]
            else:
                seg = segment_size(size)
                block = _Block(next_ptr, seg, small)
                heads.append((block, index))
                next_ptr += seg
                reserved += seg
                reserved_peak = max(reserved_peak, reserved)
            remaining = block.size - size
            if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
                rest = _Block(block.ptr + size, remaining, small, prev=block, next=block.next)
                if block.next is not None:
                    block.next.prev = rest
                block.next = rest
                block.size = size
                bisect.insort(pool, (rest.size, rest.ptr, rest))
            block.free = False
            blocks[index] = block
            charged[index] = block.size
            addresses[index] = block.ptr
        return Charges(charged, reserved_peak, addresses, _segments(heads, blocks))

    @staticmethod
    def _free(block: _Block, pool: list) -> None:
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                pool.remove((neighbour.size, neighbour.ptr, neighbour))
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        bisect.insort(pool, (block.size, block.ptr, block))


def _segments(heads: list[tuple[_Block, int]], live: dict[int, _Block]) -> list[Segment]:
    """Each segment's chain of blocks, walked from its first block: splits and merges stay inside it."""
    owner = {id(block): index for index, block in live.items()}
    segments = []
    for head, opened_by in heads:
        chain, block, total = [], head, 0
        while block is not None:
            chain.append((block.size, None if block.free else owner[id(block)]))
            total += block.size
            block = block.next
        segments.append(Segment(head.ptr, total, head.small, opened_by, tuple(chain)))
    return segments
