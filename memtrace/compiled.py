"""Compiled steps: the model's forward through Dynamo, AOTAutograd's partitioner and Inductor, on fake tensors.

``torch.compile`` traces the forward into FX graphs (graph breaks run eagerly between them), AOTAutograd
splits each into a forward and a backward graph with its min-cut partitioner (which decides what forward
saves for backward and what backward recomputes; ``torch._functorch.config.activation_memory_budget``
applies), and Inductor plans each graph's buffers: which intermediates a fused kernel never materialises,
which buffers it reuses, when it frees each. Inductor's generated wrapper code is then run on the fake
tensors with its fused kernels replaced by nothing: the buffers it allocates (``empty_strided``), the
library kernels it calls (matmuls into preallocated outputs, convolutions) and its frees (``del``) are the
compiled step's allocations, seen by the tracer as any other op's. Inductor generates C++ for CPU tensors,
which the trace is made of for every target: a CUDA prediction uses that plan for Triton's (the same
graphs and fusions of pointwise ops; reductions and templates may be planned otherwise), and says so.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch


def _nothing(*args, **kwargs):
    return None


def _empty_strided(size, stride, dtype, *args, **kwargs):
    return torch.empty_strided(size, stride, dtype=dtype, device="cpu")


def _reinterpret(t, size, stride, offset):
    return t.as_strided(size, stride, offset)


def _on_fake_tensors(compiled) -> None:
    """Makes a compiled graph's wrapper run on fake tensors under the tracer: its buffers are made by
    dispatched ops, its kernels do nothing (their outputs are preallocated buffers)."""
    fn = getattr(compiled, "current_callable", compiled)
    fn = getattr(fn, "__func__", fn)
    module_globals = getattr(fn, "__globals__", None)
    if module_globals is None or "empty_strided_cpu" not in module_globals:
        return  # no generated wrapper (a graph Inductor left to run as it is): its ops are traced as they run
    for name in list(module_globals):
        if name.startswith("empty_strided_") and name != "empty_strided_p2p":
            module_globals[name] = _empty_strided
    module_globals["reinterpret_tensor"] = _reinterpret
    for name, value in list(module_globals.items()):
        if name.startswith(("cpp_fused_", "triton_")) and callable(value):
            module_globals[name] = _nothing


@contextlib.contextmanager
def _no_kernel_builds():
    """Inductor's generated kernels are never run: they are not built either (nor is a C++ toolchain or a CUDA
    runtime looked for, which torch.utils.cpp_extension warns about on a machine without one)."""
    import logging

    from torch._inductor.async_compile import AsyncCompile

    patches = [mock.patch.object(AsyncCompile, name, lambda self, *a, **k: _nothing)
               for name in ("cpp_pybinding", "cpp") if hasattr(AsyncCompile, name)]
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield
    finally:
        logger.setLevel(level)


def _stand_in(x):
    """A fake tensor like ``x``, in ``x``'s fake mode, that the tracer never saw."""
    mode = getattr(x, "fake_mode", None)
    if not isinstance(x, torch.Tensor) or mode is None:
        return x
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), mode:
        made = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    made.requires_grad_(x.requires_grad)
    return made


def _no_caches():
    """Neither AOTAutograd's nor Inductor's cache: a cached graph would skip the compilation that makes it
    run on fake tensors (and load kernels that were built)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    stack = contextlib.ExitStack()
    for config, settings in ((inductor_config, {"force_disable_caches": True, "fx_graph_cache": False,
                                                "fx_graph_remote_cache": False}),
                             (functorch_config, {"enable_autograd_cache": False})):
        known = {k: v for k, v in settings.items() if k in getattr(config, "_config", {})}
        if known:
            stack.enter_context(config.patch(**known))
    return stack


def backend(tracker, settings: dict[str, Any]):
    """The ``torch.compile`` backend of a compiled trace: Inductor, its graphs run on fake tensors, with the
    tracer blind while it compiles (Inductor's own fake propagation is not the step)."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner(gm, example_inputs, **kwargs):
        # AOTAutograd compiles the backward graph lazily, at the first backward, with the tensors the
        # forward saved as its example inputs: blind the tracer there too, and give Inductor unrecorded
        # tensors of the same layout, which the compiled graph may keep (the step's own must be freed)
        with tracker.hidden(), _no_kernel_builds(), _no_caches():
            out = compile_fx_inner(gm, [_stand_in(x) for x in example_inputs], **kwargs)
        _on_fake_tensors(out)
        return out

    def compile_graph(gm, example_inputs):
        budget = settings.get("activation_memory_budget")
        functorch_patch = (torch._functorch.config.patch(activation_memory_budget=budget) if budget is not None
                           else contextlib.nullcontext())
        from .engine import TraceError
        from torch._inductor import compile_fx as inductor

        try:
            with tracker.hidden(), functorch_patch, _no_caches():
                return inductor.compile_fx(gm, example_inputs, inner_compile=inner)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TraceError(f"torch.compile could not compile the model's forward (Inductor: {type(exc).__name__}: "
                             f"{first}); compile=False predicts the eager step") from exc

    return compile_graph


class _Infra:
    @classmethod
    def is_infra_mode(cls) -> bool:
        # Dynamo runs eagerly under a TorchDispatchMode, except the infrastructure's own (FakeTensorMode, the
        # proxy mode): the tracer says it is one, so the model is compiled and its compiled graphs run under it
        return True


def _tracker_class():
    from .tracer import StorageTracker

    return type("CompilingTracker", (_Infra, StorageTracker), {})


CompilingTracker = _tracker_class()


def compiled_runner(module: torch.nn.Module, tracker, settings: dict[str, Any]):
    """``module`` compiled for the trace (fresh: Dynamo's caches are reset, so no earlier compilation of
    another fake copy is reused or counts toward its recompilation limit)."""
    torch._dynamo.reset()
    budget = settings.get("activation_memory_budget")
    text = ("Compiled step: the forward through torch.compile (Dynamo; graph breaks run eagerly), AOTAutograd's "
            "min-cut partitioner" + (f" with an activation memory budget of {budget:g}" if budget is not None else "")
            + " deciding what backward recomputes, and Inductor's own buffer plan for each graph, run on fake "
            "tensors with its fused kernels skipped. Compiled regions are not divided by module: their "
            "allocations are the compiled forward's and backward's.")
    if tracker.target.name != "cpu":
        text += (" On the GPU Inductor generates Triton kernels; the plan used is the one it makes for C++ on the "
                 "CPU (the same graphs and fusions of pointwise ops; a reduction or matmul template may be planned "
                 "otherwise), and the CUDA rules (cuBLAS workspaces, attention kernels) apply to the library "
                 "kernels the graphs call.")
    tracker.note(text)
    return torch.compile(module, backend=backend(tracker, settings), dynamic=False, fullgraph=False)


def warm_up(runner, model: torch.nn.Module, options, new_inputs, tracker, params: list) -> None:
    """One step the tracer does not see, with an optimizer of its own, as a compiled run's first step: it
    compiles the forward and the backward, and what the compilation keeps (Dynamo keeps objects of the
    call it traced, a graph break's output among them) is the warm-up's. The steps traced then run
    compiled code, as a measurement after a warm-up step sees them."""
    from dataclasses import replace

    from .step import build_optimizer, run_steps

    with tracker.hidden():
        optimizer = build_optimizer(options, params, tracker.target.prepare_optimizer) if options.train else None
        run_steps(runner, replace(options, steps=1, accumulation_steps=1), new_inputs, optimizer, None, "cpu")
        model.zero_grad(set_to_none=True)
        del optimizer
