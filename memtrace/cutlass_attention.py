"""The scratch memory of CUDA's memory-efficient attention (the cutlass kernels PyTorch took from xformers),
worked out from the kernel PyTorch would launch for a given shape, dtype and GPU.

Sources, all under aten/src/ATen/native/transformers/cuda/:
- attention_backward.cu, ``_efficient_attention_backward``: which kernel is launched (the first one in
  ``dispatch_cutlassB``'s list whose head dim limit, dropout support and shared memory fit), the float32
  ``delta`` it needs, and the ``workspace`` of ``p.workspace_size()`` bytes;
- mem_eff_attention/kernels/cutlassB.h: the kernel lists per GPU generation and dtype;
- mem_eff_attention/kernel_backward.h: which accumulators a kernel keeps in global memory
  (``kNeedsAccumGradQ/K/V``) and how large they are (``Params::workspace_elements_*``);
- attention.cu, ``_efficient_attention_forward``: the float32 output accumulator of the kernels that loop
  over the value head dim (``kNeedsOutputAccumulatorBuffer``).

Whether a kernel fits a GPU's shared memory is decided by ``sizeof(Kernel::SharedStorage)`` at run time,
which cannot be computed here. The lists are ordered so that a 128-wide tile is tried before its 64x64
fallback; on cards with at least 163 KiB of shared memory per block (A100, H100, B200) the 128-wide tile
is taken, elsewhere whichever of the two needs more scratch (an over- rather than an under-estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Opt-in shared memory per block by compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability").
_SHARED_MEMORY_PER_BLOCK_KIB = {(7, 0): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99,
                                (9, 0): 227, (10, 0): 227, (12, 0): 99}
_LARGE_SHARED_MEMORY_KIB = 163


@dataclass(frozen=True)
class BackwardKernel:
    block_i: int  # queries per block (kBlockSizeI)
    block_j: int  # keys per block (kBlockSizeJ)
    max_k: int  # largest head dim it takes (kMaxK)
    wide: bool = False  # a 128-wide tile listed before a 64x64 fallback: may not fit a smaller shared memory
    only_on: tuple[tuple[int, int], ...] = ()  # listed only for these compute capabilities


_K = BackwardKernel
# dispatch_cutlassB_{f16,bf16,f32}_sm80, without and with dropout: every GPU from sm80 on. The seqaligned
# variants PyTorch lists first have the same tiles, so the same scratch. For sm100 and sm120 this was read
# off PyTorch's own wheels (2.8 to 2.14, with cuobjdump): their sm_100 and sm_120 code holds the sm80
# kernels compiled in full, and only the sm50-sm75 ones as stubs that print "FATAL: kernel ... is for".
_HALF_SM80 = (_K(64, 64, 32), _K(64, 64, 64), _K(128, 64, 96, only_on=((8, 6), (8, 9))),
              _K(128, 128, 128, wide=True), _K(64, 64, 128), _K(128, 64, 65536, wide=True), _K(64, 64, 65536))
_HALF_SM80_DROPOUT = tuple(k for k in _HALF_SM80 if not k.only_on)
_FLOAT_SM80 = (_K(64, 64, 32), _K(64, 64, 64), _K(128, 64, 128, wide=True), _K(64, 64, 128),
               _K(128, 64, 65536, wide=True), _K(64, 64, 65536))
# dispatch_cutlassB_f16_sm75 / _sm70 (half), dispatch_cutlassB_f32_sm75 (float; taken for sm70 as well)
_HALF_SM75 = (_K(64, 64, 32), _K(64, 64, 64), _K(128, 64, 128, wide=True), _K(64, 64, 128),
              _K(128, 64, 65536, wide=True), _K(64, 64, 65536))
_FLOAT_SM75 = (_K(64, 64, 32), _K(64, 64, 64), _K(64, 64, 128), _K(64, 64, 65536))


def _has_large_shared_memory(capability: tuple[int, int]) -> bool:
    return _SHARED_MEMORY_PER_BLOCK_KIB.get(capability, 0) >= _LARGE_SHARED_MEMORY_KIB


def kernel_behaviour(capability: tuple[int, int]) -> tuple:
    """Everything about a GPU that the choices and sizes here read: GPUs that agree get the same scratch."""
    only_on = tuple(capability in k.only_on for k in _HALF_SM80 if k.only_on)
    return (capability >= (8, 0), capability >= (7, 0), capability == (7, 0), _has_large_shared_memory(capability),
            only_on)


def _kernel_list(half: bool, dropout: bool, capability: tuple[int, int]):
    if capability >= (8, 0):
        return (_HALF_SM80_DROPOUT if dropout else _HALF_SM80) if half else _FLOAT_SM80
    return _HALF_SM75 if half else _FLOAT_SM75


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _align_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


@dataclass(frozen=True)
class BackwardScratch:
    """What ``_efficient_attention_backward`` allocates besides the gradients, in bytes."""

    kernel: BackwardKernel
    delta_bytes: int  # float32 [B, H, M] that lives until the kernel returns
    delta_temporaries: tuple[int, ...]  # made and freed while delta is computed with tensor ops (float32)
    workspace_bytes: int  # the kernel's global-memory accumulators, freed when the op returns

    @property
    def total(self) -> int:
        return self.delta_bytes + sum(self.delta_temporaries) + self.workspace_bytes


def _backward_scratch(kernel: BackwardKernel, half: bool, capability, batch, heads, m, n, k, kv,
                      elem_size: int) -> BackwardScratch:
    f32 = 4
    # kernel_backward.h: accumulators in registers for half kernels whose head dim fits a query block
    output_in_registers = half and kernel.max_k <= kernel.block_i
    needs_accum_q = capability >= (7, 0) or half  # kEnableSplitKeys (sm70+) or a non-float output
    needs_accum_kv = not output_in_registers and half
    # the key-splitting heuristic of _efficient_attention_backward
    splits = _ceil_div(n, kernel.block_j)
    if batch * heads >= 256 and n <= 2 * kernel.block_j:
        splits = 1
    if needs_accum_kv:
        splits = min(splits, 200 // (batch * heads))
    if capability < (7, 0) or splits < 1 or torch.are_deterministic_algorithms_enabled():
        splits = 1
    gk = splits * kernel.block_j * _align_up(k, kernel.block_i) if needs_accum_kv else 0
    gv = splits * kernel.block_j * _align_up(kv, kernel.block_i) if needs_accum_kv else 0
    # one GradQTempStorage (16 bytes of lock and counter, then a block_i x block_j float tile) per
    # query block and head-dim column block
    gq = (_ceil_div(m, kernel.block_i) * _ceil_div(k, kernel.block_j) * (16 + f32 * kernel.block_i * kernel.block_j)
          // f32) if needs_accum_q else 0
    workspace = batch * heads * _align_up(gk + gv + gq, 4) * f32
    # kKernelComputesDelta: half kernels compute delta themselves (except some on sm70); otherwise it is
    # (grad_out.to(float) * out.to(float)).sum(-1).transpose(-2, -1).contiguous()
    computes_delta = half and (output_in_registers or capability != (7, 0))
    temporaries: tuple[int, ...] = ()
    if not computes_delta:
        product = batch * m * heads * kv * f32
        casts = (product, product) if elem_size != f32 else ()
        temporaries = (*casts, product, batch * m * heads * f32)
    return BackwardScratch(kernel, batch * heads * m * f32, temporaries, workspace)


def efficient_backward_scratch(dtype: torch.dtype, capability: tuple[int, int], batch: int, heads: int,
                               m: int, n: int, k: int, kv: int, dropout: bool) -> BackwardScratch:
    """The scratch of the memory-efficient attention backward for queries [batch, heads, m, k], keys
    [.., n, k] and values [.., n, kv] on a GPU of ``capability``."""
    half = dtype in (torch.float16, torch.bfloat16)
    elem_size = dtype.itemsize
    large_shared_memory = _has_large_shared_memory(capability)
    head_dim = max(k, kv)
    candidates = []
    for kernel in _kernel_list(half, dropout, capability):
        if kernel.max_k < head_dim or (kernel.only_on and capability not in kernel.only_on):
            continue
        candidates.append(kernel)
        if not kernel.wide or large_shared_memory:
            break
    scratch = [_backward_scratch(kernel, half, capability, batch, heads, m, n, k, kv, elem_size)
               for kernel in candidates]
    return max(scratch, key=lambda s: s.total)


def efficient_forward_accumulator_bytes(dtype: torch.dtype, batch: int, heads: int, m: int, k: int,
                                        kv: int) -> int:
    """The float32 output accumulator [B, M, H, Kv] of the forward kernel, or 0: only half kernels for
    head dims over 128 (the ``gmem`` ones, which loop over the value head dim) keep one."""
    if dtype not in (torch.float16, torch.bfloat16) or max(k, kv) <= 128:
        return 0
    return batch * m * heads * kv * 4
