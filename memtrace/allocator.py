"""Allocator models: what each allocation is charged on the target device.

``ExactAllocator`` charges the storage's bytes, as the CPU allocator reports them to the profiler.
``CudaCachingAllocator`` replays the alloc/free sequence through a model of PyTorch's CUDA caching
allocator (c10/cuda/CUDACachingAllocator.cpp): requests rounded up to 512 B; a small pool (<= 1 MiB)
carved from 2 MiB segments and a large pool carved from 20 MiB segments (requests under 10 MiB) or
segments of the request rounded up to 2 MiB; best-fit by (size, address); a cached block is split only
if the remainder is >= 512 B (small pool) or > 1 MiB (large pool), otherwise the whole block is charged
to ``allocated_bytes``; freed blocks merge with free neighbours and stay cached.

With ``expandable_segments`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) each pool is one
segment of reserved address space that grows at its end: a request no free block fits maps the 2 MiB
(small pool) or 20 MiB (large pool) pages it lacks after the free block at the end, if any
(find_expandable_block, try_allocate_expandable_block); blocks are split whenever 512 B or more remain
(should_split), so every allocation is charged its rounded size.
"""

from __future__ import annotations

import bisect
import os
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
    # expandable segments: record index -> (address, bytes) of the pages mapped to make room for it
    mapped: dict[int, tuple[int, int]] = field(default_factory=dict)


class ExactAllocator:
    name = label = "exact"

    def replay(self, sequence) -> Charges:
        return Charges({i: n for i, n, is_alloc in sequence if is_alloc})


@dataclass
class CudaCachingAllocator:
    """Replays (record index, bytes, is_alloc) events."""

    expandable_segments: bool = False
    name = "cuda-caching"
    EXPANDABLE_NAME = "cuda-caching, expandable segments"

    @property
    def label(self) -> str:
        return self.EXPANDABLE_NAME if self.expandable_segments else self.name

    def replay(self, sequence) -> Charges:
        pools: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}
        blocks: dict[int, _Block] = {}
        charged: dict[int, int] = {}
        addresses: dict[int, int] = {}
        heads: list[tuple[_Block, int]] = []  # each segment's first block, and the record that reserved it
        grow = _ExpandableSegments(heads) if self.expandable_segments else _Segments(heads)
        for index, nbytes, is_alloc in sequence:
            if not is_alloc:
                block = blocks.pop(index, None)
                if block is not None:
                    grow.freed(self._free(block, pools[block.small]))
                continue
            size = round_size(nbytes)
            if size == 0:
                charged[index] = 0
                continue
            small = size <= SMALL_SIZE
            pool = pools[small]
            pos = bisect.bisect_left(pool, (size, -1))
            block = pool.pop(pos)[2] if pos < len(pool) else grow(size, small, index, pool)
            remaining = block.size - size
            # should_split: the large pool keeps remainders of up to 1 MiB in the block, unless it is expandable
            if (remaining >= MIN_BLOCK) if (small or self.expandable_segments) else (remaining > SMALL_SIZE):
                rest = _Block(block.ptr + size, remaining, small, prev=block, next=block.next)
                if block.next is not None:
                    block.next.prev = rest
                block.next = rest
                block.size = size
                bisect.insort(pool, (rest.size, rest.ptr, rest))
                grow.freed(rest)
            block.free = False
            blocks[index] = block
            charged[index] = block.size
            addresses[index] = block.ptr
        return Charges(charged, grow.reserved_peak, addresses, _segments(heads, blocks), grow.mapped)

    @staticmethod
    def _free(block: _Block, pool: list) -> _Block:
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
        return block


class _Segments:
    """Where a request no cached block fits comes from: a new segment (cudaMalloc) of ``segment_size``."""

    def __init__(self, heads: list):
        self.heads = heads
        self.next_ptr = self.reserved = self.reserved_peak = 0
        self.mapped: dict[int, tuple[int, int]] = {}

    def __call__(self, size: int, small: bool, index: int, pool: list) -> _Block:
        seg = segment_size(size)
        block = _Block(self.next_ptr, seg, small)
        self.heads.append((block, index))
        self.next_ptr += seg
        self.reserved += seg
        self.reserved_peak = max(self.reserved_peak, self.reserved)
        return block

    def freed(self, block: _Block) -> None:
        pass


class _ExpandableSegments(_Segments):
    """With expandable segments: the pool's one segment maps the pages the free block at its end lacks."""

    def __init__(self, heads: list):
        super().__init__(heads)
        self.tails: dict[bool, _Block | None] = {True: None, False: None}  # the block at each segment's end
        self.mapped_bytes = {True: 0, False: 0}
        self.base = {True: 0, False: 1 << 40}  # the two segments' address ranges never meet

    def __call__(self, size: int, small: bool, index: int, pool: list) -> _Block:
        tail = self.tails[small]
        end_free = tail if tail is not None and tail.free else None
        page = SMALL_BUFFER if small else LARGE_BUFFER
        grow = -(-(size - (end_free.size if end_free else 0)) // page) * page
        start = self.base[small] + self.mapped_bytes[small]
        self.mapped_bytes[small] += grow
        self.mapped[index] = (start, grow)
        self.reserved_peak = max(self.reserved_peak, sum(self.mapped_bytes.values()))
        if end_free is not None:
            pool.remove((end_free.size, end_free.ptr, end_free))
            end_free.size += grow
            return end_free
        block = _Block(start, grow, small, prev=tail)
        if tail is None:
            self.heads.append((block, index))
        else:
            tail.next = block
        self.tails[small] = block
        return block

    def freed(self, block: _Block) -> None:
        if block.next is None:  # a free block at the end, after a free or a split
            self.tails[block.small] = block


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


ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def cuda_allocator(alloc_conf: str | None = None, environ=os.environ) -> tuple[CudaCachingAllocator, tuple[str, ...]]:
    """The caching-allocator model for ``alloc_conf`` (PYTORCH_CUDA_ALLOC_CONF's syntax), or when it is
    None for the settings a training process started from this environment would use
    (``PYTORCH_ALLOC_CONF``, else ``PYTORCH_CUDA_ALLOC_CONF``); and notes on the settings it does not model."""
    source = "alloc_conf"
    if alloc_conf is None:
        source = next((v for v in ALLOC_CONF_VARIABLES if environ.get(v)), None)
        if source is None:
            return CudaCachingAllocator(), ()
        alloc_conf = environ[source]
    expandable, ignored = False, []
    for item in alloc_conf.split(","):
        key, _, value = item.strip().partition(":")
        key, value = key.strip(), value.strip()
        if key == "expandable_segments":
            expandable = value == "True"
        elif key and not (key == "backend" and value == "native"):
            ignored.append(f"{key}:{value}")
    notes = ()
    if ignored:
        notes = (f"{source} sets {', '.join(ignored)}, which the caching-allocator model does not follow: "
                 "the prediction is for PyTorch's default for "
                 f"{'that setting' if len(ignored) == 1 else 'those settings'}.",)
    return CudaCachingAllocator(expandable_segments=expandable), notes
