"""Counts the floating-point operations of the traced step, per phase and iteration, in the same trace.

The formulas are PyTorch's own (``torch.utils.flop_counter.flop_registry``: matmuls, convolutions and
attention, forward and backward; a multiply-add is 2 FLOPs). ``FlopCounterMode`` itself is not used: it
decomposes ops it has no formula for, which would change the ops, and so the memory, of the traced step.
"""

from __future__ import annotations

from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

import torch

_FORMULAS = dict(flop_registry)
# The CUDA target runs flash attention through the CPU flash kernel (see targets.py); its cost is
# flash attention's.
_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flop
_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_backward_flop


_UNKNOWN = object()


class FlopCounter:
    """Told by the storage tracker of every op of the first iteration, after the target's rules chose it
    (one dispatch mode for both, not two). ``counts`` maps each phase to its FLOPs."""

    def __init__(self):
        self.counts: dict = {}  # Phase -> FLOPs
        self._formula_of: dict = {}  # op overload -> its formula or None, looked up once

    def count(self, func, args, kwargs, out, phase) -> None:
        formula = self._formula_of.get(func, _UNKNOWN)
        if formula is _UNKNOWN:
            formula = self._formula_of[func] = _FORMULAS.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.counts[phase] = self.counts.get(phase, 0) + int(formula(*args, **kwargs, out_val=out))
