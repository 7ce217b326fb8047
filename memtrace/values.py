"""What a trace can know of tensor values without having them: the range of an integer tensor's values and
an upper bound on the number of nonzero elements of a mask.

Fake tensors have no values, but both often follow from how a tensor was made: a ``full`` of one level id,
an ``arange``, the indices ``topk`` returns, a mask made of ``zeros`` with 128 chosen places set, and the
ops that only move such values around (views, indexing, concatenation, ``|``). They bound the sizes of the
ops sized by values far below the element count: the distinct values of a tensor (``unique``,
``bincount``) by its range, the positions of a mask's nonzeros (``nonzero``, ``x[mask]``) by its count.
torchvision's region proposals run one NMS per distinct feature level, and its samplers keep 512 proposals
an image of thousands.

What is known is kept per storage, so that every view of a storage shares it, and forgotten when an op
writes into the storage in a way not followed here: a bound is never left stale, so it is never too low.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch

aten = torch.ops.aten

# every output value is one of the inputs' values (or made from them as _range computes)
_MOVES_VALUES = {p for p in (
    aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.permute, aten.transpose, aten.t, aten.select,
    aten.slice, aten.squeeze, aten.unsqueeze, aten.alias, aten.detach, aten.clone, aten.contiguous, aten.index,
    aten.index_select, aten.gather, aten.take, aten.masked_select, aten.flip, aten.roll, aten.repeat, aten.unbind,
    aten.split, aten.split_with_sizes, aten.chunk, aten.narrow, aten.cat, aten.stack, aten.as_strided,
    aten.lift_fresh_copy, aten.lift_fresh, aten._to_copy, aten.flatten, aten.unflatten, aten.expand_copy,
    aten.view_copy, aten.permute_copy, aten.unbind_copy, aten.slice_copy, aten.select_copy, aten.amax, aten.amin,
    aten.max, aten.min, aten.sort, aten.topk, aten.unique_consecutive, aten._unique2, aten.unique_dim,
    aten.repeat_interleave, aten.where, aten.sub, aten.add, aten.mul, aten.full, aten.full_like, aten.new_full,
    aten.zeros, aten.zeros_like, aten.new_zeros, aten.ones, aten.ones_like, aten.new_ones, aten.scalar_tensor,
    aten.arange, aten.randint, aten.randperm, aten.nonzero, aten.argmax, aten.argmin, aten.argsort,
) if p is not None}
# ops returning (values, indices): the indices range over the reduced or sorted dim
_WITH_INDICES = {aten.max, aten.min, aten.sort, aten.topk}
_UNIQUE = {aten._unique2, aten.unique_dim, aten.unique_consecutive}

# the number of nonzero elements: the same as the input's (a view or copy of all of it), at most the
# input's (a part of it), at most the sum or the least of two masks'
_SAME_COUNT = {aten.view, aten._unsafe_view, aten.reshape, aten.alias, aten.detach, aten.clone, aten.contiguous,
               aten._to_copy, aten.squeeze, aten.unsqueeze, aten.flatten, aten.permute, aten.transpose, aten.t}
_PART_COUNT = {aten.select, aten.slice, aten.narrow, aten.index, aten.index_select, aten.split,
               aten.split_with_sizes, aten.chunk, aten.unbind}
_SUM_COUNT = {aten.bitwise_or, aten.logical_or, aten.cat, aten.stack}
_LEAST_COUNT = {aten.bitwise_and, aten.logical_and}
_ZEROS = {aten.zeros, aten.zeros_like, aten.new_zeros}
_SETS_PLACES = {aten.index_put_, aten.index_put, aten._index_put_impl_}  # x[idx] = v

_TRACKED_DTYPES = frozenset(d for d in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                        getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                                        getattr(torch, "uint64", None)) if d is not None)


def _tracked(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in _TRACKED_DTYPES


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return st._cdata, st


@functools.lru_cache(maxsize=None)
def _written_args(func) -> tuple[int, ...]:
    """The positions of the arguments ``func`` writes into (in-place ops, ``out=``)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return ()
    return tuple(k for k, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)


class KnownValues:
    """Per storage: the (lowest, highest) value of an integer tensor and an upper bound on the nonzero
    elements of a mask, where the trace can know them. ``after`` is told of every op."""

    def __init__(self):
        # storage key -> [weakref to the storage, range or None, count or None]
        self._known: dict[int, list] = {}

    # ---- reading ----------------------------------------------------------------------------------------
    def _entry(self, t: torch.Tensor) -> list | None:
        key, st = _storage_key(t)
        entry = self._known.get(key)
        return entry if entry is not None and entry[0]() is st else None

    def of(self, t) -> tuple[int, int] | None:
        """The range of ``t``'s values (a Python int is its own)."""
        if isinstance(t, (int, bool)):
            return int(t), int(t)
        if not _tracked(t):
            return None
        entry = self._entry(t)
        return entry[1] if entry else None

    def count(self, t) -> int | None:
        """An upper bound on the nonzero elements of ``t``; none where a stride-0 view repeats elements."""
        if not _tracked(t) or any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
            return None
        entry = self._entry(t)
        return entry[2] if entry else None

    # ---- writing ----------------------------------------------------------------------------------------
    def _set(self, t, rng=None, count=None) -> None:
        if not _tracked(t) or (rng is None and count is None):
            return
        key, st = _storage_key(t)
        entry = self._known.get(key)
        if entry is None or entry[0]() is not st:
            self._known[key] = [weakref.ref(st), rng, count]
            return
        entry[1] = rng if rng is not None else entry[1]
        entry[2] = count if count is not None else entry[2]

    def _forget(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._known.pop(t.untyped_storage()._cdata, None)

    def after(self, func, args, kwargs, out) -> None:
        """What ``out`` holds, from what its op's inputs held; what an op writing in place leaves."""
        # most outputs are floating point: nothing to know, found first since this runs after every op
        if isinstance(out, torch.Tensor):
            if out.dtype not in _TRACKED_DTYPES:
                return
            outs = (out,)
        elif isinstance(out, (tuple, list)) and any(_tracked(t) for t in out):
            outs = out
        else:
            return
        packet = getattr(func, "overloadpacket", None)
        written = _written_args(func)
        if written:
            self._written(packet, args, kwargs, written)
            return
        try:
            self._counts(packet, args, outs)
            if packet in _MOVES_VALUES:
                self._ranges(packet, func, args, kwargs, outs)
        except Exception:  # an argument of a form not foreseen: nothing known, which is always safe
            return

    def _written(self, packet, args, kwargs, written) -> None:
        """An op that writes into a tensor: x[idx] = v adds at most idx's length to its nonzeros and v's
        values to its range; fill_ adds its value; anything else leaves nothing known of it."""
        target = args[written[0]] if written[0] < len(args) else None
        if not isinstance(target, torch.Tensor) or self._entry(target) is None:
            return
        rng, count = self.of(target), self.count(target)
        if packet in _SETS_PLACES and len(written) == 1 and len(args) > 2:
            indices, value = args[1], args[2]
            index = indices[0] if len(indices) == 1 and isinstance(indices[0], torch.Tensor) else None
            placed = None if index is None else (self.count(index) if index.dtype == torch.bool else index.numel())
            new_count = None if count is None or placed is None else count + placed
            new_rng = self._union([rng, self.of(value)])
            self._forget(target)
            self._set(target, new_rng, new_count)
        elif packet is aten.fill_ and len(args) > 1:
            new_rng = self._union([rng, self.of(args[1])])
            self._forget(target)
            self._set(target, new_rng, None)
        else:
            self._forget(target)

    @staticmethod
    def _union(ranges) -> tuple[int, int] | None:
        if not ranges or any(r is None for r in ranges):
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def _counts(self, packet, args, outs) -> None:
        a = args[0] if args else None
        if packet in _ZEROS:
            count = 0
        elif packet in _SAME_COUNT or packet in _PART_COUNT:
            count = self.count(a)
        elif packet in _SUM_COUNT:
            parts = list(a) if packet in (aten.cat, aten.stack) else list(args[:2])
            counts = [self.count(t) for t in parts]
            count = None if None in counts else sum(counts)
        elif packet in _LEAST_COUNT:
            counts = [c for c in (self.count(t) for t in args[:2]) if c is not None]
            count = min(counts) if counts else None
        else:
            return
        if count is not None:
            for t in outs:
                self._set(t, count=count)

    def _ranges(self, packet, func, args, kwargs, outs) -> None:
        rng = self._range(packet, func, args, kwargs)
        a = args[0] if args else None
        if packet in _WITH_INDICES and len(outs) == 2 and isinstance(a, torch.Tensor):
            if packet is aten.topk:
                dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            else:
                dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim", -1)
            self._set(outs[1], (0, max(a.shape[dim] - 1, 0) if a.dim() else 0))
            outs = outs[:1]
        elif packet in _UNIQUE and isinstance(a, torch.Tensor):  # (values, inverse indices, counts)
            for t in outs[1:]:
                self._set(t, (0, a.numel()))
            outs = outs[:1]
        if rng is not None:
            for t in outs:
                if t.dtype != torch.bool:
                    self._set(t, (int(rng[0]), int(rng[1])))

    def _range(self, packet, func, args, kwargs):
        a = args[0] if args else None
        if packet in (aten.full, aten.new_full, aten.full_like):
            at = 2 if packet is aten.new_full else 1
            v = args[at] if len(args) > at else kwargs.get("fill_value")
            return self.of(v) if not isinstance(v, float) or v == int(v) else None
        if packet in _ZEROS:
            return 0, 0
        if packet in (aten.ones, aten.ones_like, aten.new_ones):
            return 1, 1
        if packet is aten.scalar_tensor:
            return self.of(a) if isinstance(a, int) else None
        if packet is aten.arange:
            numbers = [x for x in args if isinstance(x, (int, float))]
            start, end = (0, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
            step = numbers[2] if len(numbers) > 2 else 1
            return (int(start), int(math.ceil(end)) - 1) if step > 0 else (int(math.floor(end)) + 1, int(start))
        if packet is aten.randint:
            low, high = (0, args[0]) if len(args) < 2 or not isinstance(args[1], int) else (args[0], args[1])
            return low, high - 1
        if packet is aten.randperm:
            return 0, a - 1
        if packet is aten.nonzero:  # an index into every dim
            return 0, max(max(a.shape, default=1) - 1, 0)
        if packet in (aten.argmax, aten.argmin, aten.argsort):
            dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim")
            size = a.numel() if dim is None and packet is not aten.argsort else a.shape[-1 if dim is None else dim]
            return 0, max(size - 1, 0)
        if packet is aten.repeat_interleave and func._overloadname == "Tensor":  # indices of the repeats
            return 0, max(a.numel() - 1, 0)
        if packet in (aten.max, aten.min) and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self._union([self.of(a), self.of(args[1])])  # elementwise with another tensor
        if packet is aten.where:
            return self._union([self.of(x) for x in args[1:3]]) if len(args) == 3 else None
        if packet in (aten.add, aten.sub, aten.mul):
            x, y = self.of(a), self.of(args[1]) if len(args) > 1 else None
            alpha = kwargs.get("alpha", 1)
            if x is None or y is None or not isinstance(alpha, int):
                return None
            if packet is aten.mul:
                products = [i * j for i in x for j in y]
                return min(products), max(products)
            y = (y[0] * alpha, y[1] * alpha) if alpha >= 0 else (y[1] * alpha, y[0] * alpha)
            return (x[0] + y[0], x[1] + y[1]) if packet is aten.add else (x[0] - y[1], x[1] - y[0])
        if packet in (aten.cat, aten.stack):
            return self._union([self.of(t) for t in a])
        return self.of(a)


# ---- the bounds they give ---------------------------------------------------------------------------------
def _unique_bound(self_, *args, values: KnownValues, **kwargs) -> int | None:
    rng = values.of(self_)
    return None if rng is None else rng[1] - rng[0] + 1


def _bincount_bound(self_, weights=None, minlength=0, *, values: KnownValues) -> int | None:
    rng = values.of(self_)
    return None if rng is None or rng[0] < 0 else max(rng[1] + 1, minlength)


def _repeat_interleave_bound(repeats, *args, values: KnownValues, **kwargs) -> int | None:
    rng = values.of(repeats)
    return None if rng is None else max(rng[1], 0) * repeats.numel()


def _nonzero_bound(self_, *args, values: KnownValues, **kwargs) -> int | None:
    return values.count(self_)


def _mask_index_bound(self_, indices, *, values: KnownValues) -> int | None:
    """x[mask] with one mask over all of x's leading dims: as many rows as the mask has nonzeros."""
    if len(indices) == 1 and isinstance(indices[0], torch.Tensor) and indices[0].dtype in (torch.bool, torch.uint8):
        return values.count(indices[0])
    return None


# Bounds the fake kernels do not give (or give looser): by the op's name, from its arguments.
BOUNDS = {
    "torchvision::nms": lambda dets, scores, iou_threshold, values: dets.shape[0],  # a subset of the boxes
    "aten::_unique2": _unique_bound, "aten::unique_dim": _unique_bound, "aten::unique_consecutive": _unique_bound,
    "aten::_unique": _unique_bound, "aten::bincount": _bincount_bound,
    "aten::repeat_interleave": _repeat_interleave_bound, "aten::nonzero": _nonzero_bound,
    "aten::index": _mask_index_bound,
}
