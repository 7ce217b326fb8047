"""Measures the real step, to check predictions: on a CUDA GPU with the caching allocator's own peak
statistics, on the CPU with the profiler's allocation events.

The same ``run_steps`` that the tracer runs on fake tensors runs here on real ones, so both execute the
same Python. Both measurements start before the model's copy is made, so they are absolute: on CUDA,
``max_memory_allocated()`` less what the process already held; on the CPU, the running sum of the
profiler's allocation events (frees are negative).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
from time import time_ns
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import quantized
from .engine import preserved_rng
from .options import Options, Phase, TensorSpec, parse_options
from .step import build_optimizer, run_steps


@dataclass(frozen=True)
class Measurement:
    device: str
    peak_bytes: int
    peak_by_phase: dict[str, int]
    reserved_peak_bytes: int | None = None  # CUDA: max_memory_reserved() less what was reserved before
    device_name: str | None = None
    grad_scale: float | None = None  # fp16: GradScaler's initial scale in the run measured (see below)
    skipped_steps: int = 0  # steps GradScaler still skipped in it (0 unless every scale tried overflowed)
    # with record_data_dependent=True: the sizes of the ops sized by tensor values, in the form
    # report(data_dependent=) takes ("module:op" -> one size per call)
    data_dependent: dict[str, list] | None = None

    def to_dict(self) -> dict:
        return {"device": self.device, "device_name": self.device_name, "peak_bytes": self.peak_bytes,
                "peak_by_phase": dict(self.peak_by_phase), "reserved_peak_bytes": self.reserved_peak_bytes,
                "grad_scale": self.grad_scale, "skipped_steps": self.skipped_steps,
                "data_dependent": self.data_dependent}


def _real_input(spec: TensorSpec, device: str | torch.device = "cpu") -> torch.Tensor:
    if spec.value is not None:  # the user's own values (a detector's targets must be valid boxes)
        return spec.value.detach().to(device, copy=True)
    if spec.dtype.is_floating_point:
        return torch.randn(spec.shape, dtype=spec.dtype, device=device)
    return torch.zeros(spec.shape, dtype=spec.dtype, device=device)  # valid token ids and labels for any vocabulary


def _real_copy(model: torch.nn.Module, options: Options, device: torch.device) -> torch.nn.Module:
    """The user's model, copied onto ``device`` in the run's dtype. A model on the meta device has no
    weights to copy: it is materialised uninitialised and given small random weights (memory is the
    same whatever the values)."""
    on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    real = copy.deepcopy(model)
    if quantized.uses_bitsandbytes(real):
        quantized.after_copy(real)
    if on_meta:
        real = materialise(real, device)
    real = real.to(device)
    if options.dtype is not None:
        real = real.to(dtype=options.dtype)
    return real.train(options.train)


def materialise(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A model on the meta device made real on ``device``, uninitialised, then given small random weights
    and buffers of ones (memory is the same whatever the values)."""
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.fill_(1.0)
    return model


def measure(model: torch.nn.Module, input_shape=None, **kwargs) -> Measurement:
    """Run ``steps`` real training iterations on the device ``report()`` would predict for (``device=``,
    default "cuda") and return the measured peak. Takes the same arguments as ``memtrace.report``; leaves
    no memory, state or RNG change behind.

    ``record_data_dependent=True`` also records the size of every op sized by tensor values (``nonzero``,
    boolean masks, NMS, ...), as ``Measurement.data_dependent``: give it to ``report(data_dependent=...)``
    to predict at the sizes this run produced (a small CPU run of a detector's batch, say, for a prediction
    of the same batch on a GPU). It runs the step under a dispatch mode, which is off by default so that the
    measured run is exactly the plain one. Real tensors given in ``inputs=`` are fed with their own values,
    meta tensors with random ones."""
    if kwargs.get("parallel") is not None or kwargs.get("world_size") is not None:
        raise ValueError("measure() runs the step in this one process; it cannot measure a parallel= step, whose "
                         "ranks are processes of their own (benchmarks/distributed.py measures one)")
    if kwargs.get("checkpoint"):
        raise ValueError("measure() runs the model as it is and does not apply checkpoint=; checkpoint the model "
                         "itself (torch.utils.checkpoint in its forward, or gradient_checkpointing_enable() on a "
                         "Hugging Face model) and measure that")
    device = kwargs.get("device", "cuda")
    device = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device == "cpu":
        return measure_cpu(model, input_shape, **kwargs)
    return measure_cuda(model, input_shape, **kwargs)


def _recording(record: bool, real: torch.nn.Module, current_phase):
    """The dispatch mode that records data-dependent sizes, or nothing."""
    if not record:
        return contextlib.nullcontext()
    from .datadep import SizeRecorder

    return SizeRecorder(real, lambda: "(optimizer)" if current_phase() == "optimizer" else "(loss)")


def _clear_cublas_workspaces() -> None:
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()


def measure_cuda(model: torch.nn.Module, input_shape=None, *, record_data_dependent: bool = False,
                 **kwargs) -> Measurement:
    """Run the step for real on the current CUDA device; peaks from the caching allocator's statistics."""
    if not torch.cuda.is_available():
        raise RuntimeError("memtrace.measure(device='cuda') needs a CUDA GPU, and torch.cuda.is_available() "
                           "is False here; report() predicts without one")
    if kwargs.get("alloc_conf") is not None:
        raise ValueError("measure() runs with this process's allocator settings; set PYTORCH_CUDA_ALLOC_CONF before "
                         "CUDA starts instead of alloc_conf=")
    kwargs = {k: v for k, v in kwargs.items() if k != "gpu"}  # the card is the one present
    options: Options = parse_options(model, input_shape=input_shape, **{**kwargs, "device": "cuda"})
    dev = torch.device("cuda", torch.cuda.current_device())
    by_phase: dict[str, int] = {}
    current = ["setup"]
    base = [0]
    recorded: dict[str, list] = {}

    def close_phase() -> None:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base[0]
        by_phase[current[0]] = max(by_phase.get(current[0], 0), peak)
        torch.cuda.reset_peak_memory_stats(dev)

    def on_phase(phase: Phase, it: int) -> None:
        close_phase()
        current[0] = phase.value

    def run(init_scale: float | None) -> tuple[int, float | None]:
        """One measured run from a clean allocator; returns (reserved peak, the scaler's final scale)."""
        by_phase.clear()
        current[0] = "setup"
        real = optimizer = scaler = None
        with preserved_rng():
            torch.manual_seed(0)
            gc.collect()
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            _clear_cublas_workspaces()  # a fresh process has none yet
            base[0] = torch.cuda.memory_allocated(dev)
            reserved_base = torch.cuda.memory_reserved(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            try:
                real = _real_copy(model, options, dev)
                optimizer = build_optimizer(options, list(real.parameters()))
                scaler = _grad_scaler(options, "cuda", init_scale)
                with _recording(record_data_dependent, real, lambda: current[0]) as recorder:
                    run_steps(real, options, lambda: options.inputs.build(lambda s: _real_input(s, dev)),
                              optimizer, scaler, "cuda", on_phase)
                recorded.clear()
                recorded.update(recorder.sizes if recorder is not None else {})
                close_phase()
                return (torch.cuda.max_memory_reserved(dev) - reserved_base,
                        None if scaler is None else scaler.get_scale())
            finally:
                real = optimizer = scaler = None
                gc.collect()
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
                _clear_cublas_workspaces()

    reserved_peak, scale, skipped = _run_until_no_step_is_skipped(run)
    return Measurement("cuda", max(by_phase.values()), dict(by_phase), reserved_peak,
                       torch.cuda.get_device_name(dev), scale, skipped,
                       dict(recorded) if record_data_dependent else None)


# GradScaler starts at 2**16 and halves its scale at every step whose gradients overflow, skipping that
# step: the first steps of an fp16 run are often skipped, and a skipped step allocates no optimizer state.
# memtrace predicts steps that run (the steady state of training), so a measurement whose steps were
# skipped is repeated from a lower initial scale, as the scaler itself would settle after a few steps.
# The scale changes no allocation, only whether the step runs.
_SCALE_TRIES = 8
_SCALE_STRIDE = 2.0 ** -4  # how much lower than where the scaler ended the next try starts


def _grad_scaler(options: Options, device: str, init_scale: float | None):
    if not (options.train and options.uses_grad_scaler):
        return None
    if init_scale is None:
        return torch.amp.GradScaler(device)
    return torch.amp.GradScaler(device, init_scale=init_scale)


def _run_until_no_step_is_skipped(run) -> tuple[Any, float | None, int]:
    """Call ``run(init_scale)`` until the scaler ends where it started (no step skipped); returns
    (the result of the run kept, its initial scale, the steps it still skipped)."""
    init = None
    for _ in range(_SCALE_TRIES):
        result, final = run(init)
        start = 2.0 ** 16 if init is None else init
        if final is None or final >= start:
            return result, None if final is None else start, 0
        skipped = round(math.log2(start / final))  # the default backoff halves the scale per skipped step
        init = final * _SCALE_STRIDE
    return result, start, skipped


def _allocation_events(prof):
    """The profile's allocation events in time order: (time, bytes, frees negative; the allocator's running
    total after it, as the allocator counts it)."""
    from torch._C._profiler import _EventType

    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    out = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            out.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    out.sort(key=lambda e: e[0])
    return out


def measure_cpu(model: torch.nn.Module, input_shape=None, *, record_data_dependent: bool = False,
                **kwargs) -> Measurement:
    """Run the step for real on the CPU under the profiler; returns the allocator's absolute peak."""
    options: Options = parse_options(model, input_shape=input_shape, **{**kwargs, "device": "cpu"})
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("measuring on the CPU needs a model with real weights; this one is on the meta device")
    marks: list[tuple[str, int]] = []

    def on_phase(phase: Phase, it: int) -> None:
        marks.append((phase.value, time_ns()))

    from torch.profiler import ProfilerActivity, profile

    def run(init_scale: float | None):
        marks.clear()
        with preserved_rng(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.manual_seed(0)
            marks.append(("setup", time_ns()))
            real = _real_copy(model, options, torch.device("cpu"))
            optimizer = build_optimizer(options, list(real.parameters()))
            scaler = _grad_scaler(options, "cpu", init_scale)
            with _recording(record_data_dependent, real, lambda: marks[-1][0]) as recorder:
                run_steps(real, options, lambda: options.inputs.build(_real_input), optimizer, scaler, "cpu",
                          on_phase)
            final = None if scaler is None else scaler.get_scale()
            del real, optimizer, scaler
        return (prof, None if recorder is None else recorder.sizes), final

    (prof, recorded), scale, skipped = _run_until_no_step_is_skipped(run)
    events = _allocation_events(prof)
    total = peak = 0
    by_phase: dict[str, int] = {}
    k = 0
    for t, size, _ in events:
        total += size
        while k + 1 < len(marks) and marks[k + 1][1] <= t:
            k += 1
        phase = marks[k][0] if marks else "setup"
        by_phase[phase] = max(by_phase.get(phase, 0), total)
        peak = max(peak, total)
    return Measurement("cpu", peak, by_phase, grad_scale=scale, skipped_steps=skipped, data_dependent=recorded)



def measure_compiled_cpu(model: torch.nn.Module, input_shape=None, **kwargs) -> Measurement:
    """The real compiled step on the CPU (``torch.compile``, Inductor's C++ kernels built with the machine's
    compiler), after one warm-up step that compiles its forward and backward: the warm-up's gradients are
    dropped, and the steps then run under the profiler with a fresh optimizer. The peak is the parameters and
    buffers held before plus the highest running sum of the profiler's allocation events (no phases).
    ``compile={"activation_memory_budget": x}`` compiles with that partitioner budget."""
    from torch.profiler import ProfilerActivity, profile

    settings = kwargs.pop("compile", True)
    options: Options = parse_options(model, input_shape=input_shape, **{**kwargs, "device": "cpu"})
    budget = settings.get("activation_memory_budget") if isinstance(settings, dict) else None
    if options.amp_dtype is torch.float16:
        raise ValueError("measure_compiled_cpu does not run GradScaler's fp16 steps; give amp=False or 'bf16'")
    torch._dynamo.reset()
    partitioner = (torch._functorch.config.patch(activation_memory_budget=budget) if budget is not None
                   else contextlib.nullcontext())
    with preserved_rng(), partitioner:
        torch.manual_seed(0)
        real = _real_copy(model, options, torch.device("cpu"))
        compiled = torch.compile(real)
        new_inputs = lambda: options.inputs.build(_real_input)  # noqa: E731
        warm = build_optimizer(options, list(real.parameters()))
        run_steps(compiled, replace(options, steps=1, accumulation_steps=1), new_inputs, warm, None, "cpu")
        real.zero_grad(set_to_none=True)
        del warm
        gc.collect()
        seen, held = set(), 0
        for t in (*real.parameters(), *real.buffers()):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                held += st.nbytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            optimizer = build_optimizer(options, list(real.parameters()))
            run_steps(compiled, options, new_inputs, optimizer, None, "cpu")
            del optimizer
        del real, compiled
    torch._dynamo.reset()
    total = peak = 0
    for _, size, _ in _allocation_events(prof):
        total += size
        peak = max(peak, total)
    return Measurement("cpu", held + peak, {})
