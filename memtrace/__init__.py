"""memtrace: the GPU memory of a PyTorch training step, predicted without a GPU.

``memtrace.report(model, input_shape=...)`` traces forward, loss, backward and the optimizer step on fake
tensors, replays every allocation through a model of the target device's allocator, and returns an
immutable ``Report``: the peak, where it happens, what is live at that moment, and a row per layer.
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import TraceError
from .gpus import GPU, GPUS
from .options import Category, Phase, parse_options
from .report import Allocation, LayerRow, Peak, PhaseSpan, Report, Timeline
from .step import LossError
from .units import format_bytes, parse_size

__all__ = [
    "report", "Report", "LayerRow", "Peak", "PhaseSpan", "Timeline", "Allocation", "Category", "Phase",
    "TraceError", "LossError", "format_bytes", "parse_size", "GPU", "GPUS",
]
__version__ = "0.1.0"


def report(
    model: torch.nn.Module,
    input_shape: Any = None,
    *,
    inputs: Any = None,
    optimizer: Any = "adam",
    optimizer_kwargs: dict | None = None,
    amp: Any = False,
    dtype: Any = torch.float32,
    loss_fn: Any = None,
    device: Any = "cuda",
    steps: int = 2,
    train: bool = True,
    gpu: Any = None,
) -> Report:
    """Predict the peak allocated memory of ``steps`` training iterations of ``model``.

    Give the input as ``input_shape`` (one float tensor) or ``inputs`` (a tensor, a tuple of tensors or a
    dict of keyword tensors; meta tensors are fine). ``device="cuda"`` predicts
    ``torch.cuda.max_memory_allocated()`` of the real run; ``device="cpu"`` predicts the CPU allocator's
    peak; ``gpu=`` names the card of a CUDA run ("H100", "A100-80GB", "RTX 4090", "T4", ...; default
    H100), which decides the attention kernels available and the cuBLAS workspace size. The model is not
    modified and no memory of its size is allocated.
    """
    from .engine import trace
    from .report import build_report

    options = parse_options(
        model, input_shape=input_shape, inputs=inputs, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
        amp=amp, dtype=dtype, loss_fn=loss_fn, device=device, steps=steps, train=train, gpu=gpu,
    )
    return build_report(model, options, trace(model, options))
