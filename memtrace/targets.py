"""What the predicted run does differently from the fake-tensor run, one rule at a time.

The step is always traced on fake CPU tensors (fake CUDA tensors cannot run backward on a machine without
a GPU). A ``Target`` holds everything that makes the prediction match a given device instead: ops whose
result must be what that device would compute, how the optimizer is configured there, which tensors stay
in host memory, and the allocator model. Each rule cites where its behaviour comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .allocator import CudaCachingAllocator, ExactAllocator

aten = torch.ops.aten

try:
    from torch._subclasses.fake_tensor import unset_fake_temporarily
except ImportError:  # pragma: no cover
    import contextlib

    unset_fake_temporarily = contextlib.nullcontext


class RuleSet:
    """Op → handler(func, args, kwargs) registry; an op registered twice is a mistake, not an override."""

    def __init__(self, name: str):
        self.name = name
        self.ops: dict = {}

    def op(self, *overloads):
        def register(handler):
            for overload in overloads:
                if overload in self.ops:
                    raise ValueError(f"{self.name}: {overload} already has a rule")
                self.ops[overload] = handler
            return handler
        return register


def _host_standin(t):
    """A real CPU tensor with ``t``'s shape, dtype and a unit last stride, backed by one row of memory."""
    if not isinstance(t, torch.Tensor):
        return t
    last = t.shape[-1] if t.dim() else 1
    base = torch.empty(max(last, 1), dtype=t.dtype)
    return base.as_strided(t.shape, [0] * (t.dim() - 1) + [1] if t.dim() else [])


def _sdp_choice_on_cpu(func, args, kwargs):
    # The fake kernel of _fused_sdp_choice always answers "math" (aten/src/ATen/native/transformers/
    # attention.cpp, _fused_sdp_choice_meta); a real CPU run asks the CPU kernel, which picks the fused
    # flash kernel for most shapes. Ask the same kernel, with stand-ins that allocate one row each.
    with unset_fake_temporarily():
        real_args = [_host_standin(a) for a in args]
        real_kwargs = {k: _host_standin(v) for k, v in kwargs.items()}
        return func(*real_args, **real_kwargs)


CPU_RULES = RuleSet("cpu")
CPU_RULES.op(aten._fused_sdp_choice.default)(_sdp_choice_on_cpu)

CUDA_RULES = RuleSet("cuda")
# Approximation until the CUDA backend choice is modelled: a GPU runs a fused kernel (flash or
# memory-efficient) wherever the CPU does, and both save only the output and a float32 logsumexp.
CUDA_RULES.op(aten._fused_sdp_choice.default)(_sdp_choice_on_cpu)


def _keep_optimizer_default(opt: torch.optim.Optimizer) -> None:
    pass


def _foreach_as_on_cuda(opt: torch.optim.Optimizer) -> None:
    # torch/optim/optimizer.py, _default_to_fused_or_foreach: with foreach=None and fused=None, CUDA
    # parameters take the foreach implementation; fake CPU tensors would take the for-loop.
    for group in opt.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


def _nothing_on_host(opt, group, key, tensor) -> bool:
    return False


def _step_counter_on_host(opt, group, key, tensor) -> bool:
    # torch/optim/adam.py (_init_group) and friends: ``state["step"]`` is a CPU scalar tensor unless the
    # optimizer is capturable or fused, so it never reaches the GPU allocator.
    return key == "step" and tensor.dim() == 0 and not group.get("capturable") and not group.get("fused")


@dataclass(frozen=True)
class Target:
    name: str
    rules: RuleSet
    prepare_optimizer: Callable[[torch.optim.Optimizer], None]
    host_resident: Callable[..., bool]
    allocator: object
    notes: tuple[str, ...] = field(default=())


CPU = Target(
    name="cpu",
    rules=CPU_RULES,
    prepare_optimizer=_keep_optimizer_default,
    host_resident=_nothing_on_host,
    allocator=ExactAllocator(),
)

CUDA = Target(
    name="cuda",
    rules=CUDA_RULES,
    prepare_optimizer=_foreach_as_on_cuda,
    host_resident=_step_counter_on_host,
    allocator=CudaCachingAllocator(),
    notes=(
        "CUDA target: caching-allocator rounding and block reuse, foreach optimizers and host-side step "
        "counters are modelled; cuBLAS/cuDNN workspaces, CUDA autocast lists and the GPU's attention "
        "backend are not yet (attention is assumed fused wherever the CPU fuses it).",
    ),
)

TARGETS = {"cpu": CPU, "cuda": CUDA}
