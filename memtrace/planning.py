"""Answers built from several estimates: the largest batch that fits a memory limit (which GPUs fit is in
``gpufit.py``, what-if in ``whatif.py``).

Every answer comes from real ``memtrace.report`` estimates, never from a formula: the search uses that
memory is close to affine in the batch size only to choose which batch sizes to estimate, and confirms
each answer by estimating it and the batch size after it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from tabulate import tabulate

from .gpus import CONTEXT_ALLOWANCE_BYTES, DEFAULT_GPU, FRAGMENTATION_ALLOWANCE, lookup
from .options import Category
from .report import Report
from .units import format_bytes, parse_size

DEFAULT_CAP = 65536  # the largest batch size max_batch_size tries
_LINE_ROUNDS = 2  # candidates taken from the affine fit before the search bisects
_FIXED = (Category.PARAMETER, Category.BUFFER, Category.GRADIENT, Category.OPTIMIZER_STATE, Category.WORKSPACE)


# ---- the memory an estimate must fit in ----------------------------------------------------------

@dataclass(frozen=True)
class MemoryLimit:
    """The most a predicted allocated peak (``Report.peak_bytes``) may be, and how it was derived."""

    limit_bytes: int
    gpu: str | None = None  # the card whose usable memory this is; None for an explicit limit=
    memory_bytes: int | None = None
    context_bytes: int | None = None
    fragmentation: float | None = None

    def describe(self) -> str:
        if self.gpu is None:
            return f"limit {format_bytes(self.limit_bytes)}"
        return (f"{self.gpu}: {format_bytes(self.memory_bytes)} − {format_bytes(self.context_bytes)} CUDA context, "
                f"− {self.fragmentation:.0%} for fragmentation = {format_bytes(self.limit_bytes)} usable")

    def to_dict(self) -> dict[str, Any]:
        return {"limit_bytes": self.limit_bytes, "gpu": self.gpu, "memory_bytes": self.memory_bytes,
                "context_bytes": self.context_bytes, "fragmentation": self.fragmentation,
                "description": self.describe()}


def memory_limit(limit: Any = None, gpu: Any = None, context_bytes: Any = None,
                 fragmentation: float | None = None) -> MemoryLimit:
    """``limit=`` ("24 GiB", bytes) as given, else the usable memory of ``gpu`` (default: the default card):
    its memory less the CUDA context and a fragmentation share (``GPU.usable_bytes``), both overridable."""
    if limit is not None:
        return MemoryLimit(parse_size(limit))
    card = lookup(gpu if gpu is not None else DEFAULT_GPU)
    context = CONTEXT_ALLOWANCE_BYTES if context_bytes is None else parse_size(context_bytes)
    share = FRAGMENTATION_ALLOWANCE if fragmentation is None else fragmentation
    return MemoryLimit(card.usable_bytes(context, share), card.name, card.memory_bytes, context, share)


def limit_for(options: dict[str, Any], limit: Any, gpu: Any, context_bytes: Any, fragmentation: Any) -> MemoryLimit:
    """The limit of a planning call; ``gpu=`` also names the card the estimates are made for."""
    if gpu is not None:
        options["gpu"] = gpu
    elif limit is None and str(options.get("device", "cuda")).startswith("cpu"):
        raise ValueError("device='cpu' has no GPU memory to fill; give limit=")
    return memory_limit(limit, gpu, context_bytes, fragmentation)


# ---- inputs at any batch size ------------------------------------------------------------------------

class Batched:
    """The model's inputs with the batch size left open: dim 0 of every input tensor is the batch.

    Give ``sample_shape`` (one float input, without the batch dimension), ``input_shape`` (with it) or
    ``inputs`` (a tensor, tuple or dict of tensors, all with the same dim 0: token models vary the batch of
    ids, masks and labels together)."""

    def __init__(self, sample_shape: Any = None, input_shape: Any = None, inputs: Any = None,
                 batch_size: int | None = None):
        given = [n for n, v in (("sample_shape", sample_shape), ("input_shape", input_shape), ("inputs", inputs))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of sample_shape=, input_shape= and inputs= ({len(given)} given)")
        self.batch_size = batch_size
        self.sample_shape = self.inputs = None
        if sample_shape is not None:
            self.sample_shape = tuple(int(s) for s in sample_shape)
        elif input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if not shape:
                raise ValueError("input_shape=() has no batch dimension")
            self.sample_shape, self.batch_size = shape[1:], batch_size or shape[0]
        else:
            tensors = list(inputs.values()) if isinstance(inputs, Mapping) else (
                [inputs] if isinstance(inputs, torch.Tensor) else list(inputs))
            if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
                raise ValueError("inputs= must be tensors with a batch dimension (dim 0) to vary the batch size")
            batches = {t.shape[0] for t in tensors}
            if len(batches) != 1:
                raise ValueError(f"inputs= tensors disagree on the batch size (dim 0): {sorted(batches)}")
            self.inputs, self.batch_size = inputs, batch_size or batches.pop()

    def at(self, batch: int) -> dict[str, Any]:
        """``input_shape=`` or ``inputs=`` for ``memtrace.report`` at ``batch`` (meta tensors: no memory)."""
        if self.sample_shape is not None:
            return {"input_shape": (batch, *self.sample_shape)}

        def resize(t):
            return torch.empty((batch, *t.shape[1:]), dtype=t.dtype, device="meta")
        if isinstance(self.inputs, torch.Tensor):
            return {"inputs": resize(self.inputs)}
        if isinstance(self.inputs, Mapping):
            return {"inputs": {k: resize(t) for k, t in self.inputs.items()}}
        return {"inputs": tuple(resize(t) for t in self.inputs)}


class Estimates:
    """``memtrace.report`` at any batch size with the same options, each batch size estimated once."""

    def __init__(self, model: torch.nn.Module, batched: Batched, options: Mapping[str, Any]):
        if "verify" in options:
            raise TypeError("verify= is not a planning option; verify a single report with memtrace.report")
        self.model, self.batched, self.options = model, batched, dict(options)
        self.reports: dict[int, Report] = {}

    def __call__(self, batch: int) -> Report:
        if batch not in self.reports:
            from . import report

            self.reports[batch] = report(self.model, **self.batched.at(batch), **self.options)
        return self.reports[batch]


# ---- the largest batch that fits ----------------------------------------------------------------------

@dataclass(frozen=True)
class MaxBatch:
    batch_size: int  # 0 when even batch 1 does not fit
    limit: MemoryLimit
    report: Report | None  # at batch_size (None when 0)
    next_report: Report | None  # at batch_size + 1 (None when capped)
    estimates: int  # memtrace.report calls the search made
    capped: bool  # batch_size is the cap and fits: the true answer may be larger
    peaks: Mapping[int, int]  # every batch size estimated -> its predicted peak

    @property
    def fits(self) -> bool:
        return self.batch_size > 0

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.report is None else self.limit.limit_bytes - self.report.peak_bytes

    def headline(self) -> str:
        if not self.fits:
            return (f"Even batch 1 does not fit: its predicted peak is {format_bytes(self.next_report.peak_bytes)}, "
                    f"over the {self.limit.describe()} by "
                    f"{format_bytes(self.next_report.peak_bytes - self.limit.limit_bytes)}")
        at_least = "at least " if self.capped else ""
        return f"Largest batch that fits: {at_least}{self.batch_size} ({self.limit.describe()})"

    def table(self, fmt: str = "simple") -> str:
        rows = []
        for b in sorted(self.peaks):
            left = self.limit.limit_bytes - self.peaks[b]
            rows.append([str(b), format_bytes(self.peaks[b], 2),
                         f"{format_bytes(left, 2)} free" if left >= 0 else f"over by {format_bytes(-left, 2)}",
                         "<- answer" if b == self.batch_size else ""])
        body = tabulate(rows, headers=["Batch", "Predicted peak", "Against the limit", "Note"], tablefmt=fmt,
                        disable_numparse=True, colalign=("right", "right", "right", "left"))
        return f"{self.headline()}\n\n{body}\n\n{self.estimates} estimates"

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "fits": self.fits, "capped": self.capped,
                "limit": self.limit.to_dict(), "estimates": self.estimates,
                "headroom_bytes": self.headroom_bytes,
                "peak_bytes": None if self.report is None else self.report.peak_bytes,
                "next_peak_bytes": None if self.next_report is None else self.next_report.peak_bytes,
                "peaks": {str(b): p for b, p in sorted(self.peaks.items())}}


def _one_report_guess(r: Report, batch: int, limit: int) -> int:
    """From one estimate: the bytes that do not depend on the batch (parameters, gradients, optimizer state,
    buffers, workspaces) and the rest, taken as proportional to the batch."""
    fixed = sum(r.by_category[c] for c in _FIXED)
    per_sample = (r.peak_bytes - fixed) / batch
    return math.floor((limit - fixed) / per_sample) if per_sample > 0 else batch


def search(estimate: Estimates, limit: MemoryLimit, start: int, cap: int = DEFAULT_CAP) -> MaxBatch:
    """The largest batch b <= cap whose estimate fits, with b + 1 estimated not to fit.

    The first candidate comes from one estimate's split into fixed and per-sample bytes, and its estimate
    is the second point of a line; each later candidate c comes from the line through the estimates nearest
    the limit and is confirmed by estimating c + 1 if c fits, c - 1 if not: three estimates when memory
    is affine in the batch. After a few lines the search bisects (doubling while nothing is over the
    limit), so it ends after at most about 2 log2(cap) more estimates where memory is far from affine."""
    if cap < 1:
        raise ValueError(f"cap={cap!r} must be >= 1")
    before = set(estimate.reports)
    target = limit.limit_bytes
    # estimates made before for other limits (fits() shares them between cards) are points for the line too
    peaks: dict[int, int] = {b: r.peak_bytes for b, r in estimate.reports.items() if b <= cap}

    def peak(b: int) -> int:
        if b not in peaks:
            peaks[b] = estimate(b).peak_bytes
        return peaks[b]

    def bracket() -> tuple[int, int | None]:
        lo = max((b for b, p in peaks.items() if p <= target), default=0)
        hi = min((b for b, p in peaks.items() if p > target and b > lo), default=None)
        return lo, hi

    start = max(1, min(start, cap))
    peak(start)
    guess = _one_report_guess(estimate(start), start, target)
    lines = gallop = 0
    for _ in range(4 * cap.bit_length() + _LINE_ROUNDS + 2):
        lo, hi = bracket()
        if (hi is not None and hi == lo + 1) or lo == cap:
            break
        top = cap if hi is None else hi - 1
        fresh = []
        if len(peaks) == 1:  # the one-estimate guess: a second point for the line
            fresh = [min(max(guess, lo + 1), top)]
        elif lines < _LINE_ROUNDS:  # the line's answer, confirmed towards the answer
            lines += 1
            c = min(max(_secant(peaks, target), lo + 1), top)
            fresh = [c] if c not in peaks else []
            step = c + 1 if peak(c) <= target else c - 1
            fresh += [step] if lo < step <= min(top + 1, cap) and step not in peaks else []
        if not fresh:  # the line adds nothing, or converges slowly: narrow the bracket
            fresh = [_narrow(peaks, target, lo, hi, cap, gallop)]
            gallop += 1
        for b in fresh:
            peak(b)
    lo, hi = bracket()
    return MaxBatch(
        batch_size=lo, limit=limit, report=estimate(lo) if lo else None,
        next_report=estimate(hi) if hi is not None else None,
        estimates=len(set(estimate.reports) - before), capped=hi is None and lo == cap,
        peaks=MappingProxyType(dict(sorted(peaks.items()))),
    )


def _narrow(peaks: Mapping[int, int], target: int, lo: int, hi: int | None, cap: int, gallop: int) -> int:
    """The next batch to estimate when lines stop helping: double while nothing is over the limit; else step
    from the bracket end nearer the limit by a step that doubles (1/128 of the batch first), and bisect once
    the step reaches across the bracket."""
    if hi is None:
        return min(cap, max(2 * lo, 1))
    step = max(1, hi // 128) << gallop
    near_hi = lo == 0 or peaks[hi] - target <= target - peaks[lo]
    if near_hi and hi - step > lo:
        return hi - step
    if not near_hi and lo + step < hi:
        return lo + step
    return (lo + hi) // 2


def _secant(peaks: Mapping[int, int], target: int) -> int:
    """Where the line through the estimate nearest the limit and the one farthest from it in batch size
    reaches the limit: the near point fixes the line's height, the far one its slope (neighbours' slopes are
    noisy, since the allocator rounds and reuses blocks)."""
    points = sorted(peaks.items(), key=lambda p: abs(p[1] - target))
    b1, m1 = points[0]
    b0, m0 = max(points[1:], key=lambda p: abs(p[0] - b1))
    if b1 == b0 or (m1 - m0) * (b1 - b0) <= 0:  # flat or falling: no line to follow
        return 2 * max(b0, b1) if max(m0, m1) <= target else max(1, min(b0, b1) // 2)
    return math.floor(b0 + (target - m0) * (b1 - b0) / (m1 - m0))


def max_batch_size(model: torch.nn.Module, sample_shape: Any = None, *, input_shape: Any = None, inputs: Any = None,
                   limit: Any = None, gpu: Any = None, context_bytes: Any = None, fragmentation: float | None = None,
                   cap: int = DEFAULT_CAP, **options: Any) -> MaxBatch:
    """The largest batch size whose predicted peak fits ``limit`` ("24 GiB") or the usable memory of ``gpu``
    ("A5000"; default: the card the prediction is for). ``options`` are ``memtrace.report``'s (optimizer=,
    amp=, dtype=, checkpoint=, ...); the batch size varies dim 0 of every input."""
    batched = Batched(sample_shape, input_shape, inputs)
    mem = limit_for(options, limit, gpu, context_bytes, fragmentation)
    return search(Estimates(model, batched, options), mem, batched.batch_size or 8, cap)
