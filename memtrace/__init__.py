"""memtrace: the GPU memory of a PyTorch training step, predicted without a GPU.

``memtrace.report(model, input_shape=...)`` traces forward, loss, backward and the optimizer step on fake
tensors, replays every allocation through a model of the target device's allocator, and returns an
immutable ``Report``: the peak, where it happens, what is live at that moment, and a row per layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .engine import TraceError
from .gpus import GPU, GPUS
from .options import Category, Phase, parse_options
from .report import Allocation, LayerRow, OpRow, Peak, PhaseSpan, RankPeak, Report, Timeline
from .step import LossError
from .measure import Measurement, measure
from .units import format_bytes, parse_size
from .planning import MaxBatch, MemoryLimit, max_batch_size, memory_limit
from .gpufit import FitTable, fits
from .whatif import Comparison, Levers, compare, levers
from .epoch import EpochPlan, plan_epoch

__all__ = [
    "report", "Report", "LayerRow", "Peak", "PhaseSpan", "Timeline", "Allocation", "Category", "Phase",
    "TraceError", "LossError", "format_bytes", "parse_size", "GPU", "GPUS", "measure", "Measurement",
    "max_batch_size", "MaxBatch", "MemoryLimit", "memory_limit", "fits", "FitTable", "compare", "Comparison",
    "levers", "Levers", "plan_epoch", "EpochPlan", "RankPeak", "OpRow",
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
    dtype: Any = None,
    loss_fn: Any = None,
    device: Any = "cuda",
    steps: int = 2,
    accumulation_steps: int = 1,
    train: bool = True,
    gpu: Any = None,
    verify: bool = False,
    checkpoint: Any = None,
    alloc_conf: str | None = None,
    data_dependent: Any = None,
    parallel: Any = None,
    world_size: int | None = None,
    compile: Any = None,
    keep_output: bool = True,
) -> Report:
    """Predict the peak allocated memory of ``steps`` training iterations of ``model``.

    Give the input as ``input_shape`` (one float tensor) or ``inputs`` (a tensor, a tuple of tensors or a
    dict of keyword tensors; meta tensors are fine). ``device="cuda"`` predicts
    ``torch.cuda.max_memory_allocated()`` of the real run; ``device="cpu"`` predicts the CPU allocator's
    peak; ``gpu=`` names the card of a CUDA run ("H100", "A100-80GB", "RTX 4090", "T4", ...; default
    H100), which decides the attention kernels available and the cuBLAS workspace size. The model is not
    modified and no memory of its size is allocated.

    ``verify=True`` also runs the real step (``memtrace.measure``) on this machine's device of that kind
    and puts the measured peak beside the prediction (``report.measured``, ``report.error_percent``);
    without ``gpu=``, a CUDA prediction is then made for the GPU present.

    ``compile=True`` (or a model given as ``torch.compile(model)``) predicts the compiled step: the
    forward through Dynamo, AOTAutograd's partitioner and Inductor's buffer plan (``memtrace.compiled``);
    ``compile={"activation_memory_budget": 0.5}`` sets the partitioner's budget. ``compile=False`` predicts
    the eager step of a compiled model. With ``verify=True`` and ``device="cpu"``, the real compiled step
    is measured after a warm-up step that compiles it.

    ``accumulation_steps=k`` runs k forward/backward passes per optimizer step (gradient accumulation:
    the loss divided by k, the gradients summed in ``.grad``), so the gradients of earlier micro-batches
    are live while later ones run backward; the batch in the inputs is then one micro-batch.

    ``alloc_conf="expandable_segments:True"`` predicts for those CUDA caching-allocator settings
    (``PYTORCH_CUDA_ALLOC_CONF``'s syntax); by default the environment's are used.

    Ops whose output size depends on tensor values (``nonzero``, boolean masks, ``unique``, NMS) get the
    largest size they allow, so the prediction is an upper bound for them; ``data_dependent=`` chooses
    otherwise: a fraction of that size, a dict of ``"module"`` / ``"module:op"`` patterns to sizes (lists
    of sizes, for successive calls), or a callable(site); ``memtrace.measure(..., record_data_dependent=
    True)`` records the sizes a real run produced, in that form. Every choice is listed in
    ``report.assumptions``.

    ``parallel={"fsdp": 8}`` predicts one rank of sharded training: the fake copy is sharded by FSDP2's own
    ``fully_shard`` over a fake process group ("replicate" for HSDP, "reshard_after_forward", "mp_policy",
    "units"), with tensor parallel by ``parallelize_module`` ("tp", "tp_plan"), or replicated by
    ``DistributedDataParallel`` ({"ddp": 8}, with "bucket_cap_mb", "gradient_as_bucket_view",
    "broadcast_buffers", "zero": 1), or by ``parallel=fn(model, mesh)`` with ``world_size=``; the inputs
    are one rank's micro-batch, and the report is the rank with the largest peak, listing the ranks that
    differ (``report.ranks``).

    ``keep_output=False`` drops the model's output once the loss is computed, before backward, as the Hugging
    Face Trainer's step does (by default it stays referenced through backward, as in
    ``out = model(x); loss = loss_fn(out, y); loss.backward()``).

    ``checkpoint="auto"`` traces the step with the model's repeated blocks (the children of an
    ``nn.ModuleList`` or ``nn.Sequential`` of same-typed modules) under non-reentrant activation
    checkpointing; a list of module names checkpoints those modules instead.
    """
    from .engine import eager_module
    from .gpus import present
    from .sweep import trace_step

    if verify and parallel is not None:
        raise ValueError("verify=True measures the step in this one process; a parallel= step runs on its ranks "
                         "(benchmarks/distributed.py measures one with real processes)")
    if verify and checkpoint:
        raise ValueError("verify=True measures the step without checkpointing; give checkpoint=None to verify")
    if verify and alloc_conf is not None:
        raise ValueError("verify=True measures with this process's allocator settings; set PYTORCH_CUDA_ALLOC_CONF "
                         "before CUDA starts instead of alloc_conf=")
    if verify and gpu is None and str(device).startswith("cuda"):
        gpu = present()  # checked against this machine's GPU: predict for that card
    from .engine import _is_compiled_wrapper

    from .targets import TORCH_VERSION

    if compile is None and _is_compiled_wrapper(model) and TORCH_VERSION >= (2, 6):
        compile = True  # torch.compile(model): the compiled step (before 2.6, the eager one, with a note)
    if verify and compile and str(device).split(":")[0] != "cpu":
        raise ValueError("verify=True measures a compiled step on the CPU only (device='cpu', after a warm-up step "
                         "that compiles it); a compiled CUDA step is not measured yet")

    eager = eager_module(model)  # a torch.compile'd model: its module (the report says it shows the eager step)
    options = parse_options(
        eager, input_shape=input_shape, inputs=inputs, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
        amp=amp, dtype=dtype, loss_fn=loss_fn, device=device, steps=steps, accumulation_steps=accumulation_steps,
        train=train, gpu=gpu, checkpoint=checkpoint, alloc_conf=alloc_conf, data_dependent=data_dependent,
        parallel=parallel, world_size=world_size, compile=compile, keep_output=keep_output,
    )
    result = replace(trace_step(model, eager, options).report(), source=(model, options))
    if verify and options.compile is not None:
        from .measure import measure_compiled_cpu

        result = replace(result, measured=measure_compiled_cpu(
            eager, input_shape, inputs=inputs, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, amp=amp,
            dtype=dtype, loss_fn=loss_fn, steps=steps, accumulation_steps=accumulation_steps, train=train,
            compile=compile, keep_output=keep_output))
    elif verify:
        from .measure import measure

        result = replace(result, measured=measure(
            model, input_shape, inputs=inputs, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, amp=amp,
            dtype=dtype, loss_fn=loss_fn, device=options.device, steps=steps, accumulation_steps=accumulation_steps,
            train=train, keep_output=keep_output))
    return result

