"""Counts the floating-point operations of the traced step, per phase and iteration, in the same trace.

The formulas are PyTorch's own (``torch.utils.flop_counter.flop_registry``: matmuls, convolutions and
attention, forward and backward; a multiply-add is 2 FLOPs). ``FlopCounterMode`` itself is not used: it
decomposes ops it has no formula for, which would change the ops, and so the memory, of the traced step.
"""

from __future__ import annotations

from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

import torch

aten = torch.ops.aten


def _heads_as_query(query_shape, *shapes):
    """Grouped-query attention (``enable_gqa``) gives keys and values fewer heads than queries; every
    query head still multiplies a whole key and value head. The formulas of older PyTorch releases (2.11
    among them) assert equal heads, so the key/value shapes are given the query's head count."""
    return [(*s[:1], query_shape[1], *s[2:]) for s in shapes]


def _attention(query, key, value, *args, out_val=None, **kwargs) -> int:
    q = tuple(query.shape)
    return sdpa_flop_count(q, *_heads_as_query(q, tuple(key.shape), tuple(value.shape)))


def _attention_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    q = tuple(query.shape)
    return sdpa_backward_flop_count(tuple(grad_out.shape), q, *_heads_as_query(q, tuple(key.shape),
                                                                               tuple(value.shape)))


def _grouped_mm(mat_a, mat_b, *args, out_val=None, **kwargs) -> int:
    """torch._grouped_mm (mixture-of-experts layers), which PyTorch's registry has no formula for: every
    output element is a dot product over the contraction dimension, except for 2-D x 2-D (the weight
    gradient), where each group's [K, N] block sums over that group's rows only, all rows once in total."""
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        return 2 * mat_a.shape[0] * mat_a.shape[1] * mat_b.shape[1]
    return 2 * out_val.numel() * mat_a.shape[-1]


_FORMULAS = dict(flop_registry)
# The CUDA target runs flash attention through the CPU flash kernel (see targets.py); its cost is flash
# attention's. Every fused attention op takes (query, key, value, ...) and its backward (grad_out, query,
# key, value, ...).
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    for _op, _formula in ((_name, _attention), (_name + "_backward", _attention_backward)):
        if hasattr(aten, _op):
            _FORMULAS[getattr(aten, _op)] = _formula
if hasattr(aten, "_grouped_mm"):  # PyTorch 2.8 and later
    _FORMULAS[aten._grouped_mm] = _grouped_mm


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
