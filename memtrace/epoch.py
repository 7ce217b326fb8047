"""Epoch planning: iterations per epoch, the FLOPs of one iteration (counted in the traced step), a lower
bound on the epoch's time at a GPU's datasheet peak, and an estimate from a measured throughput."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate

from .gpus import DEFAULT_GPU, lookup
from .planning import Batched
from .report import Report


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def precision_of(report: Report, gpu) -> str:
    """The tensor-core precision a step's matmuls and convolutions can run at: the AMP or parameter dtype;
    for float32, TF32 where the card has it (cuDNN convolutions use it by default, matmuls when
    ``torch.backends.cuda.matmul.allow_tf32`` is set), since a lower bound must assume the faster unit."""
    s = report.settings
    if s["amp"] in ("fp16", "bf16"):
        return s["amp"]
    dtype = s["dtype"].split("+")[0]  # the dtype most of the parameters are in
    if dtype in ("float16", "bfloat16"):
        return "fp16" if dtype == "float16" else "bf16"
    return "tf32" if gpu.peak_tflops("tf32") is not None else "fp32"


@dataclass(frozen=True)
class EpochPlan:
    dataset_size: int
    batch_size: int
    iterations: int  # ceil(dataset_size / batch_size)
    forward_flops: int  # of one iteration, at batch_size
    backward_flops: int
    gpu: str
    precision: str
    peak_tflops: float | None  # the card's datasheet peak dense throughput at that precision
    samples_per_second: float | None = None  # measured, if given

    @property
    def flops_per_iteration(self) -> int:
        return self.forward_flops + self.backward_flops

    @property
    def flops_per_epoch(self) -> float:
        """FLOPs grow with the batch, so the last, partial batch costs its share: samples x FLOPs per sample."""
        return self.flops_per_iteration * self.dataset_size / self.batch_size

    @property
    def lower_bound_seconds(self) -> float | None:
        """The epoch at the card's peak throughput with nothing else running: no run is faster."""
        return None if not self.peak_tflops else self.flops_per_epoch / (self.peak_tflops * 1e12)

    @property
    def estimated_seconds(self) -> float | None:
        return None if not self.samples_per_second else self.dataset_size / self.samples_per_second

    def table(self, fmt: str = "simple") -> str:
        peak = f"{self.peak_tflops:g} TFLOPS {self.precision}" if self.peak_tflops else f"no {self.precision} figure"
        rows = [
            ["Iterations per epoch", f"{self.iterations:,} (= ceil({self.dataset_size:,} / {self.batch_size}))"],
            ["FLOPs per iteration", f"{_flops(self.flops_per_iteration)} (forward {_flops(self.forward_flops)}, "
                                    f"backward {_flops(self.backward_flops)})"],
            ["FLOPs per epoch", _flops(self.flops_per_epoch)],
            [f"Lower bound on epoch time ({self.gpu} at {peak})", _duration(self.lower_bound_seconds)],
        ]
        if self.samples_per_second:
            rows.append([f"Estimated epoch time at a measured {self.samples_per_second:g} samples/s",
                         _duration(self.estimated_seconds)])
        body = tabulate(rows, tablefmt=fmt if fmt != "simple" else "plain", disable_numparse=True)
        return (body + "\n\nThe bound counts matmul, convolution and attention FLOPs (torch.utils.flop_counter) at "
                "the datasheet peak dense rate; real runs reach a fraction of it (data loading, elementwise ops, "
                "the optimizer step and kernel efficiency are not in it).")

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"dataset_size": self.dataset_size, "batch_size": self.batch_size, "iterations": self.iterations,
                "forward_flops": self.forward_flops, "backward_flops": self.backward_flops,
                "flops_per_iteration": self.flops_per_iteration, "flops_per_epoch": self.flops_per_epoch,
                "gpu": self.gpu, "precision": self.precision, "peak_tflops": self.peak_tflops,
                "lower_bound_seconds": self.lower_bound_seconds, "samples_per_second": self.samples_per_second,
                "estimated_seconds": self.estimated_seconds}


def plan_epoch(model: torch.nn.Module | None = None, input_shape: Any = None, *, inputs: Any = None,
               dataset_size: int, report: Report | None = None, gpu: Any = None, precision: str | None = None,
               samples_per_second: float | None = None, **options: Any) -> EpochPlan:
    """Plan one epoch over ``dataset_size`` samples at the batch size of the inputs. The FLOPs come from the
    traced step of ``report`` if given (no new trace), else from a new ``memtrace.report`` with ``options``.
    ``precision`` ("fp32", "tf32", "fp16", "bf16") overrides the one read from the step's settings."""
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size={dataset_size!r} must be an int >= 1")
    if samples_per_second is not None and not samples_per_second > 0:
        raise ValueError(f"samples_per_second={samples_per_second!r} must be > 0")
    if report is None:
        if model is None:
            raise ValueError("give model= and its inputs, or report= from memtrace.report")
        from . import report as estimate

        report = estimate(model, input_shape, inputs=inputs, gpu=gpu, **options)
    batch = Batched(None, input_shape=report.settings["inputs"][0]["shape"]).batch_size
    if not report.flops:
        raise ValueError("the report has no FLOP counts (an inference or callable trace); plan a training step")
    card = lookup(gpu if gpu is not None else (report.settings.get("gpu") or DEFAULT_GPU))
    precision = precision or precision_of(report, card)
    from .options import Phase

    return EpochPlan(
        dataset_size=dataset_size, batch_size=batch, iterations=math.ceil(dataset_size / batch),
        forward_flops=report.flops.get(Phase.FORWARD, 0), backward_flops=report.flops.get(Phase.BACKWARD, 0),
        gpu=card.name, precision=precision, peak_tflops=card.peak_tflops(precision),
        samples_per_second=samples_per_second,
    )
