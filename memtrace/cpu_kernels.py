"""What oneDNN's CPU kernels allocate that a fake tensor cannot show, read from the kernels themselves.

Convolutions. On the CPU, ``aten::convolution`` and ``aten::convolution_backward`` run oneDNN (or, for shapes it does not
take, PyTorch's own im2col kernels), and allocate buffers through PyTorch's CPU allocator that they free
before they return: copies of the input, the weight and the output gradient reordered into the blocked
layout the chosen kernel wants, the output computed in that layout and then reordered into the tensor
returned, and the kernel's scratchpad (per-thread reduction buffers, im2col columns). A fake tensor cannot
show them: their sizes and order depend on the instruction set of this machine's CPU, the thread count and
the kernel oneDNN picks, none of which the shapes decide. On ResNet-18 they are the largest buffers alive
inside the step's busiest ops (a 512 x 512 x 3 x 3 weight reordered in forward, in backward, and its
gradient computed in a blocked layout before it is copied out: 9 MiB each).

So the CPU target asks the kernels: each distinct convolution runs once for real, on this machine, with
zero-filled tensors of the traced shapes, layouts, dtypes and requires-grad flags, in the traced grad mode,
under the profiler, which reports every allocation and free the op makes; the trace then makes the same
allocations in the same order around the op's outputs. It runs at the traced batch: oneDNN picks other
kernels at other batch sizes (a strided 1 x 1 convolution of 12 images reorders its input where one of 3 to
5 images does not), so sizes read at a small batch cannot be scaled up. The cost is one real run of each
distinct convolution and its backward (ResNet-18 at batch 8: about a second on two cores), and the memory
of one convolution at a time. The runs happen in a thread of their own, outside the trace's fake-tensor and
dispatch modes, and their results are kept for the process (keyed by everything the kernel sees).

Recurrent layers. ``aten::mkldnn_rnn_layer`` (an LSTM layer on the CPU) returns oneDNN's workspace, a byte
tensor its backward reads, whose size is oneDNN's; PyTorch's fake kernel returns it empty (an LSTM language
model was 15-18% under). The same run of the real kernel gives its size, which the traced output takes,
and the layer's own buffers.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from dataclasses import dataclass

import torch

from memtrace.options import Category

NOTE = (
    "CPU convolutions: the buffers oneDNN (or PyTorch's im2col kernels) allocates and frees inside each "
    "convolution and its backward (reordered inputs, weights and gradients, outputs computed in a blocked "
    "layout, the kernel's scratchpad) were read from the kernels on this machine, by running each distinct "
    "convolution and its backward once for real, on zero-filled tensors of the traced shapes, under the "
    "profiler; they depend on this CPU's instruction set and the thread count ({threads} here), so the "
    "prediction is this machine's.")

UNREAD_NOTE = (
    "CPU convolutions: for some convolutions the buffers their kernels allocate and free inside the op could "
    "not be read (the kernel failed to run here, or kept a buffer past its return); those buffers are not in "
    "the prediction, which can be under the real peak by up to a few copies of such a convolution's input "
    "and weight.")

TOO_LARGE_NOTE = (
    "CPU convolutions: the buffers of convolutions with over 1 GiB of tensors or 25 billion multiply-adds "
    "were not read from their kernels (memtrace runs a convolution for real to read them, and does not run "
    "one that large); they are not in the prediction, which can be under the real peak by a few copies of "
    "such a convolution's input and weight (1-2% on ResNets).")

LABEL = "CPU convolution buffer (read from the kernel)"

# (op, what the kernel sees, threads) -> _Plan or None; kept for the process
_RUNS: dict[tuple, _Plan | None] = {}


@dataclass(frozen=True)
class _Plan:
    """One op's allocations in order: ("alloc", bytes) for a buffer freed inside the op, ("free", k) for
    the free of the k-th such buffer, ("output", i) where the i-th output tensor is allocated; and each
    output's bytes (None where it is not a tensor)."""

    steps: tuple[tuple[str, int], ...]
    output_bytes: tuple[int | None, ...] = ()


def _signature(args) -> tuple:
    """What the kernel sees: every tensor's shape, strides (the memory format the op picks follows them, a
    size-1 dimension's stride included), dtype and whether it requires a gradient, every other argument as
    it is, and grad mode."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append(("tensor", tuple(a.shape), tuple(a.stride()), a.dtype, a.requires_grad))
        elif isinstance(a, (list, tuple)):
            sig.append(tuple(int(v) if not isinstance(v, bool) else v for v in a))
        else:
            sig.append(a)
    # grad mode and requires_grad too: oneDNN runs a forward-inference kernel, with other buffers, when no
    # gradient is wanted (aten/src/ATen/native/mkldnn/Conv.cpp); backward runs with grad mode off
    return tuple(sig), torch.is_grad_enabled()


def _materialise(sig) -> list:
    args = []
    for a in sig:
        if isinstance(a, tuple) and a and a[0] == "tensor":
            _, shape, strides, dtype, requires_grad = a
            args.append(torch.empty_strided(shape, strides, dtype=dtype).zero_().requires_grad_(requires_grad))
        else:
            args.append(list(a) if isinstance(a, tuple) else a)
    return args


def _run(func, signature, threads: int) -> _Plan | None:
    """Runs the op once for real (after one call that creates oneDNN's primitives) under the profiler and
    returns its allocations in order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    result: list = [None]

    def body():
        torch.set_num_threads(threads)
        sig, grad = signature
        args = _materialise(sig)
        with torch.set_grad_enabled(grad):
            func(*args)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = func(*args)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        owners = {t.untyped_storage().data_ptr(): i for i, t in enumerate(outputs)
                  if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()}
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                f = node.extra_fields
                events.append((node.start_time_ns, f.alloc_size < 0, f.alloc_size, f.ptr))
            stack.extend(node.children)
        events.sort(key=lambda e: (e[0], e[1]))  # an allocation before a free of the same instant
        # addresses are reused (a buffer freed early and the output allocated at its address), so an output
        # is the allocation at its address that is still live when the op has returned
        allocations: list[tuple[int, int]] = []  # (size, ptr)
        order: list[tuple[str, int]] = []  # ("alloc", allocation) / ("free", allocation)
        live: dict[int, int] = {}
        for _, _, size, ptr in events:
            if size > 0:
                live[ptr] = len(allocations)
                order.append(("alloc", len(allocations)))
                allocations.append((size, ptr))
            elif ptr in live:
                order.append(("free", live.pop(ptr)))
        kept = {a for a in live.values() if allocations[a][1] in owners}
        if len(kept) != len(live):  # a buffer the op kept past its return that is not an output: not understood
            return
        steps: list[tuple[str, int]] = []
        buffer: dict[int, int] = {}
        for kind, a in order:
            if kind == "free":
                steps.append(("free", buffer[a]))
            elif a in kept:
                steps.append(("output", owners[allocations[a][1]]))
            else:
                buffer[a] = len(buffer)
                steps.append(("alloc", allocations[a][0]))
        result[0] = _Plan(tuple(steps), tuple(t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) else None
                                              for t in outputs))

    def guarded():
        try:
            body()
        except Exception:  # the kernel refused these shapes here, or the profiler is busy: no plan
            pass

    worker = threading.Thread(target=guarded, name="memtrace-cpu-kernel")
    with _silent_fd2():  # the profiler's C++ side logs every session start and stop to fd 2
        worker.start()
        worker.join()
    return result[0]


@contextlib.contextmanager
def _silent_fd2():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# the largest convolution run for real: its tensors' bytes, and multiply-adds of the forward (a backward
# does about twice the work); one at the limits takes seconds on a few cores and a GiB or two of memory
MAX_BYTES = 1 << 30
MAX_MACS = 25 * 10**9


def _too_large(func, args, out) -> bool:
    """Whether the op is larger than memtrace runs for real: over MAX_BYTES of tensors, or for a
    convolution over MAX_MACS multiply-adds."""
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    nbytes = sum(t.numel() * t.element_size() for t in (*args, *outputs) if isinstance(t, torch.Tensor))
    if nbytes > MAX_BYTES:
        return True
    if func is torch.ops.aten.convolution.default:
        x, weight, y, transposed = args[0], args[1], out, args[6]
    elif func is torch.ops.aten.convolution_backward.default:
        y, x, weight, transposed = args[0], args[1], args[2], args[7]
    else:
        return False
    # each output element takes C_in / groups x kernel multiply-adds (the weight's size over its first
    # dimension); transposed, the weight is (C_in, C_out / groups, kernel) and each input element takes as many
    return (x if transposed else y).numel() * math.prod(weight.shape[1:]) > MAX_MACS


def kernel_plan(func, args) -> _Plan | None:
    """The allocations the real CPU kernel makes inside ``func(*args)`` (see the module docstring), or None
    when they cannot be read."""
    sig = _signature(args)
    key = (func, sig, torch.get_num_threads())
    if key not in _RUNS:
        _RUNS[key] = _run(func, sig, key[2])
    return _RUNS[key]


def replay(tracker, func, args, out) -> None:
    """Makes the kernel's own allocations around ``func``'s outputs ``out``, in the real order."""
    if _too_large(func, args, out):
        tracker.note(TOO_LARGE_NOTE)
        return
    plan = kernel_plan(func, args)
    if plan is None:
        tracker.note(UNREAD_NOTE)
        return
    tracker.note(NOTE.format(threads=torch.get_num_threads()))
    _replay(tracker, func, plan, out if isinstance(out, (tuple, list)) else (out,), LABEL)


def _replay(tracker, func, plan: _Plan, outputs, label: str) -> None:
    frees = []
    for kind, value in plan.steps:
        if kind == "alloc":
            frees.append(tracker.allocate_scratch(value, label, Category.WORKSPACE))
        elif kind == "free":
            frees[value]()
        elif value < len(outputs) and isinstance(outputs[value], torch.Tensor):
            tracker.record_outputs(outputs[value], func)


RNN_NOTE = (
    "CPU recurrent layers: oneDNN's workspace, which each LSTM layer's forward returns and keeps for its "
    "backward, and the buffers the layer allocates inside its kernels, were read from the kernels on this "
    "machine (each distinct layer and its backward run once for real on zero-filled tensors of the traced "
    "shapes, under the profiler); PyTorch's fake kernel returns an empty workspace.")

RNN_UNREAD_NOTE = (
    "CPU recurrent layers: oneDNN's workspace, which each LSTM layer's forward keeps for its backward, "
    "could not be read from the kernel here (the layer failed to run, or was over 1 GiB of tensors); PyTorch's "
    "fake kernel returns it empty, so the prediction is under the real peak by that workspace (about 30 MiB "
    "per layer of 512 units over 8 x 128 tokens).")


RNN_LABEL = "CPU recurrent layer buffer (read from the kernel)"


def replay_recurrent(tracker, func, args, out):
    """``mkldnn_rnn_layer`` and its backward: the real workspace in place of the fake kernel's empty one
    (a 1-D byte tensor, the forward's last output), and the kernel's own allocations around the outputs.
    Returns the outputs to use."""
    outputs = list(out)
    plan = None if _too_large(func, args, outputs) else kernel_plan(func, args)
    if plan is None or len(plan.output_bytes) != len(outputs):
        if func is torch.ops.aten.mkldnn_rnn_layer.default:
            tracker.note(RNN_UNREAD_NOTE)
        return out
    tracker.note(RNN_NOTE)
    for i, (t, real) in enumerate(zip(outputs, plan.output_bytes)):
        if isinstance(t, torch.Tensor) and real is not None and t.dim() == 1 and t.dtype == torch.uint8 \
                and t.numel() != real:
            outputs[i] = torch.empty(real, dtype=torch.uint8, device=t.device)
    _replay(tracker, func, plan, outputs, RNN_LABEL)
    return type(out)(outputs)
