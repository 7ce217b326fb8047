"""Counts the floating-point operations of the traced step, per phase and iteration, in the same trace.

The formulas are PyTorch's own (``torch.utils.flop_counter.flop_registry``: matmuls, convolutions and
attention, forward and backward; a multiply-add is 2 FLOPs). ``FlopCounterMode`` itself is not used: it
decomposes ops it has no formula for, which would change the ops, and so the memory, of the traced step.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

import torch

_FORMULAS = dict(flop_registry)
# The CUDA target runs flash attention through the CPU flash kernel (see targets.py); its cost is
# flash attention's.
_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop
_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_backward_flop


class FlopCounter(TorchDispatchMode):
    """Sits below the storage tracker, so it sees the ops the target's rules chose; ``where()`` says which
    (phase, iteration) an op belongs to."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.counts: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FORMULAS.get(func._overloadpacket) if hasattr(func, "_overloadpacket") else None
        if formula is not None:
            key = self.where()
            self.counts[key] = self.counts.get(key, 0) + int(formula(*args, **kwargs, out_val=out))
        return out
