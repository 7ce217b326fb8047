"""Answers built from several estimates: the largest batch that fits a memory limit (which GPUs fit is in
``gpufit.py``, what-if in ``whatif.py``).

Every answer comes from real ``memtrace.report`` estimates, never from a formula: the search uses that
memory is close to affine in the batch size only to choose which batch sizes to estimate, and confirms
each answer by estimating it and the batch size after it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
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


# ---- progress, for someone watching -------------------------------------------------------------------

class Progress:
    """Says on one terminal line what the answers are doing: each trace as it starts, with the traces and
    replays so far (an answer over the catalog takes tens of seconds)."""

    def __init__(self, stream):
        self.stream, self.traced, self.replayed, self.shown = stream, 0, 0, False

    def trace(self, batch: int, options: Mapping[str, Any]) -> None:
        self.traced += 1
        gpu = options.get("gpu")
        on = f" for {getattr(gpu, 'name', gpu)}" if gpu is not None else ""
        self._say(f"tracing batch {batch}{on} (trace {self.traced}; {self.replayed} replayed so far)")

    def replay(self) -> None:
        self.replayed += 1

    def _say(self, text: str) -> None:
        self.stream.write(f"\r\x1b[Kmemtrace: {text}")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


_PROGRESS: list[Progress | None] = [None]


@contextlib.contextmanager
def progress(stream):
    """While the block runs, the answers' estimates say what they do on ``stream`` (a terminal)."""
    shown, _PROGRESS[0] = _PROGRESS[0], Progress(stream)
    try:
        yield _PROGRESS[0]
    finally:
        _PROGRESS[0].close()
        _PROGRESS[0] = shown


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


class _Regime:
    """A line through two traces (``sweep.Line``) and the batch sizes it holds for: strictly between the
    nearest traces on either side that it does not reproduce (the step changes there: a kernel's scratch
    above some size, say), with the traces it reproduces byte for byte."""

    def __init__(self, line):
        self.line = line
        self.low, self.high = 0, math.inf
        self.agreed: set[int] = set(line.batches)

    def holds(self, batch: int) -> bool:
        return self.low < batch < self.high

    def exclude(self, batch: int) -> bool:
        """Narrows the bounds to leave out ``batch``; False if it lies between the line's own batch sizes,
        where nothing can be replayed."""
        a, b = sorted(self.line.batches)
        if a < batch < b:
            return False
        if batch < a:
            self.low = max(self.low, batch)
        else:
            self.high = min(self.high, batch)
        return True


class Estimates:
    """``memtrace.report`` at any batch size with the same options, each batch size traced at most once.

    Where the traces at two batch sizes line up (``sweep.Line``: the same allocations in the same order, every
    size affine in the batch), ``peak`` replays the allocator model on the line's sizes instead of tracing.
    Every trace is compared with the replay of each line that covers it: one that differs narrows the
    line's range to the batch sizes on this side of it (``_Regime``), and a trace no line covers may line up
    with another such trace in a line of its own."""

    _LOOSE = 4  # traces kept to line up later, at most

    def __init__(self, model: torch.nn.Module, batched: Batched, options: Mapping[str, Any], replay: bool = True,
                 lines_of: Estimates | None = None):
        """``lines_of``: the estimates of the same step for another GPU that makes the same choices
        (``gpufit._behaviour``), whose lines these share: a line replays the sizes that depend on the GPU
        for the GPU asked for, and every trace of either checks the lines."""
        from .engine import eager_module

        if "verify" in options:
            raise TypeError("verify= is not a planning option; verify a single report with memtrace.report")
        self.model, self.batched, self.options = model, batched, dict(options)
        self.eager = eager_module(model)
        self.reports: dict[int, Report] = {}  # traced
        self._cache: dict[int, tuple[_Regime, Report]] = {}  # batch -> the line that replayed it, the report
        self.replay = replay
        if lines_of is None:
            self.regimes: list[_Regime] = []
            self._loose: dict = {}  # (batch, estimates) -> sweep.Traced of traces no line reproduces, the latest few
            self._family: list[Estimates] = [self]
        else:
            self.regimes, self._loose, self._family = lines_of.regimes, lines_of._loose, lines_of._family
            self._family.append(self)

    def _options(self, batch: int):
        from .options import parse_options

        return parse_options(self.eager, **self.batched.at(batch), **self.options)

    def __call__(self, batch: int) -> Report:
        """The traced report at ``batch``."""
        if batch not in self.reports:
            from .sweep import trace_step

            if _PROGRESS[0] is not None:
                _PROGRESS[0].trace(batch, self.options)
            traced = trace_step(self.model, self.eager, self._options(batch))
            self.reports[batch] = traced.report()
            if self.replay:
                self._check(batch, traced)
        return self.reports[batch]

    def _check(self, batch: int, traced) -> None:
        """A new trace: checked against every line that covers it; if none reproduces it, lined up with the
        traces no line reproduces, nearest batch size first."""
        from .sweep import Line, NoLine

        reproduced = [self._compare(regime, batch) for regime in list(self.regimes) if regime.holds(batch)]
        if any(reproduced):
            return
        for key in sorted(self._loose, key=lambda k: abs(k[0] - batch)):
            other, owner = key
            if other == batch:
                continue
            try:
                line = Line(self._loose[key], other, traced, batch)
            except NoLine:
                continue
            del self._loose[key]
            regime = _Regime(line)
            self.regimes.append(regime)
            # every other trace in its range must agree with it, or narrows the range
            for member in self._family:
                for b in member.reports:
                    if (b, member) not in ((other, owner), (batch, self)) and regime in self.regimes \
                            and regime.holds(b):
                        member._compare(regime, b)
            return
        self._loose[(batch, self)] = traced
        while len(self._loose) > self._LOOSE:
            del self._loose[next(iter(self._loose))]

    def _compare(self, regime: _Regime, batch: int) -> bool:
        """Whether ``regime``'s replay at ``batch`` is this estimate's trace there; where it is not, the
        regime's range narrows to leave ``batch`` out, or the regime is dropped."""
        if self._replay_with(regime, batch) == self.reports[batch]:
            regime.agreed.add(batch)
            return True
        if not regime.exclude(batch):
            self.regimes.remove(regime)
        return False

    def _regime(self, batch: int) -> _Regime | None:
        """The line that replays ``batch``: the one whose range holds it, if only one does (where two do,
        the step changes somewhere between their traces, and a trace must say how)."""
        holding = [r for r in self.regimes if r.holds(batch)]
        return holding[0] if len(holding) == 1 else None

    @property
    def replays(self) -> dict[int, Report]:
        """The batch sizes replayed so far whose line still holds there, and their reports."""
        return {b: r for b, (regime, r) in self._cache.items() if b not in self.reports and self._regime(b) is regime}

    def _replay_with(self, regime: _Regime, batch: int) -> Report | None:
        traced = regime.line.at(batch, self._options(batch))
        return None if traced is None else traced.report()

    def _replay(self, batch: int) -> Report | None:
        regime = self._regime(batch)
        if regime is None:
            return None
        cached = self._cache.get(batch)
        if cached is None or cached[0] is not regime:
            replayed = self._replay_with(regime, batch)
            if replayed is None:
                return None
            self._cache[batch] = cached = (regime, replayed)
            if _PROGRESS[0] is not None:
                _PROGRESS[0].replay()
        return cached[1]

    def between_agreeing(self, batch: int) -> bool:
        """Whether ``batch`` is replayed by a line that reproduces a trace at ``batch`` (for another GPU of
        the same kind), or three or more traces, byte for byte, on both sides of it."""
        regime = self._regime(batch)
        return regime is not None and (batch in regime.agreed or (
            len(regime.agreed) >= 3 and min(regime.agreed) <= batch <= max(regime.agreed)))

    def settled(self, batch: int, trust: str) -> Report:
        """The report an answer gives at ``batch``: traced; with ``trust="span"`` a replay between traces its
        line reproduces (``between_agreeing``); with ``trust="replay"`` any replay."""
        if batch not in self.reports and (trust == "replay" or (trust == "span" and self.between_agreeing(batch))):
            replayed = self._replay(batch)
            if replayed is not None:
                return replayed
        return self(batch)

    def peak(self, batch: int) -> int:
        """The predicted peak at ``batch``: traced, or replayed from a line that holds there."""
        if batch in self.reports:
            return self.reports[batch].peak_bytes
        replayed = self._replay(batch)
        return replayed.peak_bytes if replayed is not None else self(batch).peak_bytes


# ---- the largest batch that fits ----------------------------------------------------------------------

@dataclass(frozen=True)
class MaxBatch:
    batch_size: int  # 0 when even batch 1 does not fit
    limit: MemoryLimit
    report: Report | None  # at batch_size (None when 0)
    next_report: Report | None  # at batch_size + 1 (None when capped)
    estimates: int  # traces the search made
    capped: bool  # batch_size is the cap and fits: the true answer may be larger
    peaks: Mapping[int, int]  # every batch size estimated -> its predicted peak
    replays: int = 0  # estimates replayed from two traces that line up (sweep.Line), not traced

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
        return f"{self.headline()}\n\n{body}\n\n{_estimates_text(self.estimates, self.replays)}"

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "fits": self.fits, "capped": self.capped,
                "limit": self.limit.to_dict(), "estimates": self.estimates, "replays": self.replays,
                "headroom_bytes": self.headroom_bytes,
                "peak_bytes": None if self.report is None else self.report.peak_bytes,
                "next_peak_bytes": None if self.next_report is None else self.next_report.peak_bytes,
                "peaks": {str(b): p for b, p in sorted(self.peaks.items())}}


def _estimates_text(traces: int, replays: int) -> str:
    text = f"{traces} estimate{'s' if traces != 1 else ''} traced"
    if replays:
        text += (f", {replays} replayed from the traces (their allocations line up, sizes affine in the batch; "
                 "the answer and the batch after it are traced)")
    return text


def _one_report_guess(r: Report, batch: int, limit: int) -> int:
    """From one estimate: the bytes that do not depend on the batch (parameters, gradients, optimizer state,
    buffers, workspaces) and the rest, taken as proportional to the batch."""
    fixed = sum(r.by_category[c] for c in _FIXED)
    per_sample = (r.peak_bytes - fixed) / batch
    return math.floor((limit - fixed) / per_sample) if per_sample > 0 else batch


def search(estimate: Estimates, limit: MemoryLimit, start: int, cap: int = DEFAULT_CAP,
           trust: str = "traced") -> MaxBatch:
    """The largest batch b <= cap whose estimate fits, with b + 1 estimated not to fit.

    The first candidate comes from one estimate's split into fixed and per-sample bytes, and its estimate
    is the second point of a line; each later candidate c comes from the line through the estimates nearest
    the limit and is confirmed by estimating c + 1 if c fits, c - 1 if not: three estimates when memory
    is affine in the batch. After a few lines the search bisects (doubling while nothing is over the
    limit), so it ends after at most about 2 log2(cap) more estimates where memory is far from affine.

    Estimates after the first two are replays where the traces line up (``Estimates.peak``). The answer
    and the batch after it are traced (``trust="traced"``), or with ``trust="span"`` replayed where they
    lie between three or more traces the replay reproduces exactly; a trace that differs from its replay
    makes the search run again without the replays it contradicts."""
    if trust not in ("traced", "span", "replay"):
        raise ValueError(f"trust={trust!r}: 'traced', 'span' or 'replay'")
    if cap < 1:
        raise ValueError(f"cap={cap!r} must be >= 1")
    before, replays_before = set(estimate.reports), set(estimate.replays)
    result = _search(estimate, limit, start, cap, trust)
    while not set(result.peaks) <= set(estimate.reports) | set(estimate.replays):
        result = _search(estimate, limit, start, cap, trust)  # a trace contradicted replays it used: again without them
    return replace(result, estimates=len(set(estimate.reports) - before),
                   replays=len(set(estimate.replays) - replays_before - set(estimate.reports)))


def _search(estimate: Estimates, limit: MemoryLimit, start: int, cap: int, trust: str) -> MaxBatch:
    target = limit.limit_bytes
    # estimates made before for other limits (fits() shares them between cards) are points for the line too
    peaks: dict[int, int] = {b: r.peak_bytes for b, r in estimate.reports.items() if b <= cap}
    peaks.update((b, r.peak_bytes) for b, r in estimate.replays.items() if b <= cap)

    def peak(b: int) -> int:
        if b not in peaks:
            peaks[b] = estimate.peak(b)
        return peaks[b]

    def bracket() -> tuple[int, int | None]:
        lo = max((b for b, p in peaks.items() if p <= target), default=0)
        hi = min((b for b, p in peaks.items() if p > target and b > lo), default=None)
        return lo, hi

    start = max(1, min(start, cap))
    first = estimate.settled(start, trust)
    peaks.setdefault(start, first.peak_bytes)
    guess = _one_report_guess(first, start, target)
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
    report = estimate.settled(lo, trust) if lo else None
    next_report = estimate.settled(hi, trust) if hi is not None else None
    return MaxBatch(
        batch_size=lo, limit=limit, report=report, next_report=next_report, estimates=0,
        capped=hi is None and lo == cap, peaks=MappingProxyType(dict(sorted(peaks.items()))),
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
