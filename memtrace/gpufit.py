"""Which GPUs fit: for each card of the catalog, its usable memory, whether the step fits at the given batch
size and with what headroom, and the largest batch size that fits (``planning.search`` per card)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate

from .cutlass_attention import kernel_behaviour
from .gpus import _CATALOG, GPU, lookup
from .planning import DEFAULT_CAP, Batched, Estimates, MaxBatch, memory_limit, search
from .units import format_bytes


def _behaviour(card: GPU, attention: bool) -> tuple:
    """What the CUDA target's choices take from a card (targets.py): which attention kernels its compute
    capability has (flash from sm80, memory-efficient from sm50) and whether it is sm90 or newer (its
    cuBLAS workspace size stands for that); for a step that runs fused attention, also what picks the
    memory-efficient kernel (cutlass_attention.py). Cards that agree run the same ops and allocations; what
    else a card decides is a size a rule computes from it (a reduction's scratch from its SM count, the
    cuBLAS workspace), so the traces of one replay the others' steps (``sweep.Line``)."""
    coarse = (card.capability >= (8, 0), card.capability >= (5, 0), card.cublas_workspace_bytes())
    return coarse + (kernel_behaviour(card.capability) if attention else ())


def _runs_fused_attention(report) -> bool:
    return any("attention" in a.op for a in report.allocations)


@dataclass(frozen=True)
class FitRow:
    gpu: str
    memory_bytes: int
    usable_bytes: int
    peak_bytes: int  # predicted at the given batch size on this card
    largest: MaxBatch

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.peak_bytes


@dataclass(frozen=True)
class FitTable:
    batch_size: int
    rows: tuple[FitRow, ...]
    estimates: int  # traced
    replays: int = 0  # replayed from two traces that line up (sweep.Line)

    def table(self, fmt: str = "simple") -> str:
        rows = [[r.gpu, format_bytes(r.memory_bytes), format_bytes(r.usable_bytes),
                 (f"yes ({format_bytes(r.headroom_bytes)} free)" if r.fits
                  else f"no (over by {format_bytes(-r.headroom_bytes)})"),
                 ("≥ " if r.largest.capped else "") + str(r.largest.batch_size)] for r in self.rows]
        body = tabulate(rows, headers=["GPU", "Memory", "Usable", f"Fits at batch {self.batch_size}", "Largest batch"],
                        tablefmt=fmt, disable_numparse=True, colalign=("left", "right", "right", "left", "right"))
        how = f"{self.estimates} estimates traced"
        if self.replays:
            how += (f", {self.replays} replayed from them;\neach card's answer is traced, or replayed between "
                    "traces its replay reproduces byte for byte")
        return f"{body}\n\nUsable = memory − CUDA context − fragmentation share; {how}"

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "estimates": self.estimates, "replays": self.replays, "rows": [
            {"gpu": r.gpu, "memory_bytes": r.memory_bytes, "usable_bytes": r.usable_bytes, "peak_bytes": r.peak_bytes,
             "fits": r.fits, "headroom_bytes": r.headroom_bytes, "max_batch_size": r.largest.batch_size,
             "capped": r.largest.capped} for r in self.rows]}


def fits(model: torch.nn.Module, sample_shape: Any = None, *, input_shape: Any = None, inputs: Any = None,
         batch_size: int | None = None, gpus: Any = None, context_bytes: Any = None,
         fragmentation: float | None = None, cap: int = DEFAULT_CAP, **options: Any) -> FitTable:
    """For each GPU (default: the catalog ``memtrace.GPUS``): its usable memory, whether the step fits at the
    given batch size and with what headroom, and the largest batch size that fits."""
    batched = Batched(sample_shape, input_shape, inputs, batch_size)
    if batched.batch_size is None:
        raise ValueError("give the batch size: input_shape= or inputs= with a batch dimension, or batch_size=")
    if str(options.get("device", "cuda")).startswith("cpu") or "gpu" in options:
        raise ValueError("fits() predicts a CUDA run on each card; leave out device= and gpu=")
    cards = list(_CATALOG) if gpus is None else [lookup(g) for g in gpus]
    # the newest card runs every fused attention kernel an older one would
    probe = max(cards, key=lambda card: card.capability)
    first = Estimates(model, batched, {**options, "gpu": probe})
    attention = _runs_fused_attention(first(batched.batch_size))
    # cards that make the same choices share lines: the traces of one replay the others' steps, sized for each
    leaders: dict[tuple, Estimates] = {_behaviour(probe, attention): first}
    estimates = {probe.name: first}
    for card in cards:
        if card.name not in estimates:
            leader = leaders.get(_behaviour(card, attention))
            estimates[card.name] = Estimates(model, batched, {**options, "gpu": card}, lines_of=leader)
            leaders.setdefault(_behaviour(card, attention), estimates[card.name])
    limits = {card.name: memory_limit(None, card, context_bytes, fragmentation) for card in cards}
    # each group traces the given batch and the one after it: a line through them replays the given batch for
    # every card of the group (sized for each), unless the step changes there
    given = batched.batch_size
    for leader in leaders.values():
        for b in (given, given + 1):
            if b <= cap:
                leader(b)
    # every card's answers from replays first; then in each group the smallest answer and the batch after the
    # largest are traced, so that every answer lies between traces its line reproduces, or is traced itself
    answers: dict[tuple, list[int]] = {}
    for card in cards:
        found = search(estimates[card.name], limits[card.name], batched.batch_size, cap, trust="replay")
        answers.setdefault(_behaviour(card, attention), []).append(found.batch_size)
    for group, batches in answers.items():
        for b in (min(batches), max(batches) + 1):
            if 0 < b <= cap:
                leaders[group](b)
    rows = []
    for card in cards:
        estimate, mem = estimates[card.name], limits[card.name]
        largest = search(estimate, mem, batched.batch_size, cap, trust="span")
        rows.append(FitRow(card.name, card.memory_bytes, mem.limit_bytes,
                           estimate.settled(batched.batch_size, "span").peak_bytes, largest))
    return FitTable(batched.batch_size, tuple(rows), sum(len(e.reports) for e in estimates.values()),
                    sum(len(e.replays) for e in estimates.values()))
