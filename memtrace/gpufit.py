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
    """What the CUDA target takes from a card (targets.py): which attention kernels its compute capability
    has (flash from sm80, memory-efficient from sm50) and its cuBLAS workspace size; for a step that runs
    fused attention, also what picks the memory-efficient kernel (cutlass_attention.py). Cards that agree
    give identical estimates, so they share them."""
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
    estimates: int

    def table(self, fmt: str = "simple") -> str:
        rows = [[r.gpu, format_bytes(r.memory_bytes), format_bytes(r.usable_bytes),
                 (f"yes ({format_bytes(r.headroom_bytes)} free)" if r.fits
                  else f"no (over by {format_bytes(-r.headroom_bytes)})"),
                 ("≥ " if r.largest.capped else "") + str(r.largest.batch_size)] for r in self.rows]
        body = tabulate(rows, headers=["GPU", "Memory", "Usable", f"Fits at batch {self.batch_size}", "Largest batch"],
                        tablefmt=fmt, disable_numparse=True, colalign=("left", "right", "right", "left", "right"))
        return f"{body}\n\nUsable = memory − CUDA context − fragmentation share; {self.estimates} estimates"

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "estimates": self.estimates, "rows": [
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
    shared: dict[tuple, Estimates] = {_behaviour(probe, attention): first}
    rows = []
    for card in cards:
        estimate = shared.setdefault(_behaviour(card, attention), Estimates(model, batched, {**options, "gpu": card}))
        mem = memory_limit(None, card, context_bytes, fragmentation)
        largest = search(estimate, mem, batched.batch_size, cap)
        rows.append(FitRow(card.name, card.memory_bytes, mem.limit_bytes, estimate(batched.batch_size).peak_bytes,
                           largest))
    return FitTable(batched.batch_size, tuple(rows), sum(len(e.reports) for e in shared.values()))
