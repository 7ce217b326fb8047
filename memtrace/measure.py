"""Measures the real step, for checking predictions: on the CPU with the profiler's allocation events.

The same ``run_steps`` that the tracer runs on fake tensors runs here on real ones, so both execute the
same Python. The CPU allocator's peak is the running sum of the profiler's allocation events (frees are
negative), taken over a region that starts before the model's copy is made, so it is absolute.
"""

from __future__ import annotations

import copy
from time import time_ns
from dataclasses import dataclass

import torch

from .engine import preserved_rng
from .options import Options, Phase, TensorSpec, parse_options
from .step import build_optimizer, make_inputs, run_steps


@dataclass(frozen=True)
class Measurement:
    device: str
    peak_bytes: int
    peak_by_phase: dict[str, int]


def _real_input(spec: TensorSpec) -> torch.Tensor:
    if spec.dtype.is_floating_point:
        return torch.randn(spec.shape, dtype=spec.dtype)
    return torch.zeros(spec.shape, dtype=spec.dtype)  # valid token ids and labels for any vocabulary


def _allocation_events(prof):
    from torch._C._profiler import _EventType

    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    out = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            out.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    out.sort(key=lambda e: e[0])
    return out


def measure_cpu(model: torch.nn.Module, input_shape=None, **kwargs) -> Measurement:
    """Run the step for real on the CPU under the profiler; returns the allocator's absolute peak."""
    options: Options = parse_options(model, input_shape=input_shape, **{**kwargs, "device": "cpu"})
    marks: list[tuple[str, int]] = []

    def on_phase(phase: Phase, it: int) -> None:
        marks.append((phase.value, time_ns()))

    from torch.profiler import ProfilerActivity, profile

    with preserved_rng(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        marks.append(("setup", time_ns()))
        real = copy.deepcopy(model).to(dtype=options.dtype) if options.dtype != torch.float32 else copy.deepcopy(model)
        real.train(options.train)
        optimizer = build_optimizer(options, list(real.parameters()))
        scaler = torch.amp.GradScaler("cpu") if (options.train and options.uses_grad_scaler) else None
        run_steps(real, options, lambda: make_inputs(options.inputs, _real_input), optimizer, scaler, "cpu",
                  on_phase)
        del real, optimizer, scaler
    events = _allocation_events(prof)
    total = peak = 0
    by_phase: dict[str, int] = {}
    k = 0
    for t, size in events:
        total += size
        while k + 1 < len(marks) and marks[k + 1][1] <= t:
            k += 1
        phase = marks[k][0] if marks else "setup"
        by_phase[phase] = max(by_phase.get(phase, 0), total)
        peak = max(peak, total)
    return Measurement("cpu", peak, by_phase)

