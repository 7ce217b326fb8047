"""What the predicted run does differently from the fake-tensor run, one rule at a time.

The step is always traced on fake CPU tensors (fake CUDA tensors cannot run backward on a machine without
a GPU). A ``Target`` holds everything that makes the prediction match a given device instead: ops whose
result must be what that device would compute, how the optimizer is configured there, which tensors stay
in host memory, and the allocator model. Each rule cites where its behaviour comes from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import inspect
import os
import re

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from . import cpu_kernels
from .allocator import ExactAllocator, cuda_allocator
from .autocast import autocast_dtype, cast, cuda_autocast
from .cuda_reduce import reduce_launches
from .cutlass_attention import efficient_backward_scratch, efficient_forward_accumulator_bytes
from .gpus import DEFAULT_GPU, GPU, lookup
from .options import Category, Phase
from .units import format_bytes


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a PyTorch version string: "2.11.0+cu130" -> (2, 11); a pre-release such as
    "2.9.0a0+git..." counts as its release."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


TORCH_VERSION = _release(torch.__version__)


class RuleSet:
    """What a device does differently, as handlers keyed by what they replace: ``ops`` by aten overload,
    seen below autograd, called ``handler(tracker, func, args, kwargs)``; ``functions`` by torch function,
    seen above autograd so a replacement builds its own autograd graph, called ``handler(target, func,
    args, kwargs)``. Registering one twice is a mistake, not an override."""

    def __init__(self, name: str):
        self.name = name
        self.ops: dict = {}
        self.functions: dict = {}
        self.function_notes: dict = {}  # torch function -> what the prediction leaves out where it runs

    def op(self, *overloads):
        return self._register(self.ops, overloads)

    def function(self, *funcs):
        return self._register(self.functions, funcs)

    def note_on(self, text: str | Callable, *funcs) -> None:
        """Says ``text`` in the report of any step that calls one of ``funcs``; a callable ``text(target,
        args, kwargs)`` says what it returns for that call, if anything."""
        self._register(self.function_notes, funcs)(text)

    def _register(self, table: dict, keys):
        def register(handler):
            for key in keys:
                if key in table:
                    raise ValueError(f"{self.name}: {key} already has a rule")
                table[key] = handler
            return handler
        return register


class FunctionRules(TorchFunctionMode):
    """Applies a RuleSet's torch-function rules while the step is traced, and hands its notes to
    ``note``."""

    def __init__(self, target: Target, note: Callable[[str], None]):
        super().__init__()
        self.target = target
        self.table = target.rules.functions
        self.notes = target.rules.function_notes
        self.note = note

    @staticmethod
    def for_target(target: Target, note: Callable[[str], None]):
        rules = target.rules
        return FunctionRules(target, note) if rules.functions or rules.function_notes else contextlib.nullcontext()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        text = self.notes.get(func)
        if callable(text):
            text = text(self.target, args, kwargs or {})
        if text:
            self.note(text)
        handler = self.table.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self.target, func, args, kwargs or {})


CPU_RULES = RuleSet("cpu")  # the fake CPU run is the CPU run: the CPU kernels' own choices apply


@CPU_RULES.op(torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
def _cpu_convolution_buffers(tracker, func, args, kwargs):
    # the buffers oneDNN allocates and frees inside a convolution, read from the kernel itself
    # (memtrace/cpu_kernels.py)
    out = func(*args, **kwargs)
    if not kwargs:
        cpu_kernels.replay(tracker, func, args, out)
    return out


@CPU_RULES.op(torch.ops.aten.mkldnn_rnn_layer.default, torch.ops.aten.mkldnn_rnn_layer_backward.default)
def _cpu_recurrent_workspace(tracker, func, args, kwargs):
    # the fake kernel returns oneDNN's workspace empty; the real one is read from the kernel
    # (memtrace/cpu_kernels.py)
    out = func(*args, **kwargs)
    return out if kwargs else cpu_kernels.replay_recurrent(tracker, func, args, out)


CUDA_RULES = RuleSet("cuda")


def _arguments(signature_of, args, kwargs) -> dict:
    bound = inspect.signature(signature_of).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """F.scaled_dot_product_attention's parameters (it is a builtin without an inspectable signature)."""


@CUDA_RULES.function(F.dropout)
def _fused_dropout(target, func, args, kwargs):
    # aten/src/ATen/native/Dropout.cpp, dropout(): on CUDA (is_fused_kernel_acceptable) training-mode
    # dropout with 0 < p < 1 is native_dropout, whose backward keeps a bool mask (1 B per element); the CPU
    # path keeps a noise tensor of the input's dtype instead.
    a = _arguments(func, args, kwargs)
    x, p = a["input"], a["p"]
    if not a["training"] or a["inplace"] or not 0 < p < 1 or x.numel() == 0:
        return func(*args, **kwargs)
    return torch.native_dropout(x, p, True)[0]


def _rms_norm_signature(input, normalized_shape, weight=None, eps=None):
    """F.rms_norm's and torch.rms_norm's parameters."""


class _FusedRmsNorm(torch.autograd.Function):
    """aten::_fused_rms_norm as CUDA runs it (layer_norm_kernel.cu): one kernel writes the output, in the
    input's dtype, and rstd, float32 for 16- and 32-bit inputs, of the rows' shape; autograd keeps the
    input, rstd and the weight (derivatives.yaml), and the backward kernel writes the input's and the
    weight's gradients. On the CPU the same op decomposes above autograd (pow, mean, rsqrt, mul), which
    keeps the normalised input too."""

    @staticmethod
    def forward(ctx, x, weight, shape, eps):
        # below autograd the op reaches the tracer whole: its CPU decomposition then runs inside the fake
        # mode, where only its outputs are seen
        with torch._C._AutoDispatchBelowAutograd():
            out, rstd = torch.ops.aten._fused_rms_norm(x, shape, weight, eps)
        ctx.shape = shape
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]]
        with torch._C._AutoDispatchBelowAutograd():
            grad_x, grad_w = torch.ops.aten._fused_rms_norm_backward(grad, x, ctx.shape, rstd, weight, mask)
        return grad_x, grad_w, None, None


# The CUDA library has _fused_rms_norm from PyTorch 2.9 on (2.8's has no such kernel); before it, CUDA ran
# the same composite as the CPU.
_CUDA_FUSES_RMS_NORM = TORCH_VERSION >= (2, 9)


def _fused_rms_norm_as_on_cuda(target, func, args, kwargs):
    # layer_norm.cpp, rms_norm_symint: a dense, non-complex input whose weight has its dtype runs
    # _fused_rms_norm, which has a CUDA kernel; other inputs take the composite
    a = _arguments(_rms_norm_signature, args, kwargs)
    x, weight, shape = a["input"], a["weight"], a["normalized_shape"]
    if autocast_dtype() is not None and TORCH_VERSION >= (2, 12):
        # CUDA autocast runs rms_norm in float32 from PyTorch 2.12 (autocast_mode.h, its fp32 list); this rule
        # runs above autocast. 2.9-2.11 list it nowhere, so a 16-bit activation meets a float32 weight and
        # takes the composite below (measured on an H100 with 2.11: "Mismatch dtype between input and weight").
        x, weight = cast(x, torch.float32), cast(weight, torch.float32)
    channels_last = not x.is_contiguous() and (
        (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))
    if channels_last or not x.is_floating_point() or (weight is not None and weight.dtype != x.dtype):
        return func(*args, **kwargs)
    return _FusedRmsNorm.apply(x, weight, [shape] if isinstance(shape, int) else list(shape), a["eps"])


if _CUDA_FUSES_RMS_NORM:
    CUDA_RULES.function(F.rms_norm, torch.rms_norm)(_fused_rms_norm_as_on_cuda)


def cuda_sdp_backend(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa=False, capability=(9, 0)) -> str:
    """The backend CUDA's scaled_dot_product_attention picks, in its default priority order flash >
    memory-efficient > math (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, use_flash_attention
    and use_mem_efficient_attention), for dense 4-D inputs."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or 0 in q.shape or 0 in k.shape:
        return "math"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "math"
    head_dim = q.shape[-1]
    same_heads = q.shape[1] == k.shape[1] == v.shape[1]
    half = q.dtype in (torch.float16, torch.bfloat16)
    # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120: flash's backward cannot run
    # head dims in (192, 224], or over 224 with dropout, on sm86-sm89 and sm120-sm121
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    no_wide_backward = (8, 6) <= capability <= (8, 9) or (12, 0) <= capability <= (12, 1)
    wide_head_unsupported = training and no_wide_backward and (
        192 < head_dim <= 224 or (head_dim > 224 and dropout_p > 0))
    if (half and attn_mask is None and head_dim == k.shape[-1] == v.shape[-1] and head_dim <= 256
            and capability >= (8, 0) and (same_heads or enable_gqa) and not wide_head_unsupported
            and not (is_causal and q.shape[2] != k.shape[2])):
        return "flash"
    alignment = 8 if half else 4  # 16-byte aligned rows
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if capability >= (8, 0) else (torch.float32, torch.float16)
    if (q.dtype in dtypes and same_heads and head_dim % alignment == 0 and v.shape[-1] % alignment == 0
            and capability >= (5, 0) and _mask_fits_fused_kernels(q, k, attn_mask)):
        return "efficient"
    return "math"


def _math_gqa_backward_note(target, args, kwargs) -> str | None:
    """Grouped-query attention that CUDA runs on the math backend (float32: the fused kernels take 16-bit
    grouped heads only): on an H100 its backward held one more [B, H, L, S] float32 tensor than the trace
    shows (an 840M LLaMA at 2 x 2048 in float32 was 2.6% low), which no kernel rule accounts for yet."""
    a = _arguments(_sdpa_signature, args, kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if autocast_dtype() is not None or not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] == k.shape[1]:
        return None
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return None
    if cuda_sdp_backend(q, k, v, a["attn_mask"], a["dropout_p"], a["is_causal"], a["enable_gqa"],
                        target.gpu.capability) != "math":
        return None
    extra = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 4
    return (f"Grouped-query attention in {str(q.dtype).removeprefix('torch.')} runs CUDA's math backend, whose "
            f"backward held one more [batch, heads, query, key] float32 tensor on an H100 than this trace shows "
            f"(benchmarks/RESULTS.md): the prediction may be low by up to {format_bytes(extra)} for attention of "
            f"shape {list(q.shape)}.")


CUDA_RULES.note_on(_math_gqa_backward_note, F.scaled_dot_product_attention)


def _mask_fits_fused_kernels(q, k, attn_mask) -> bool:
    # sdp_utils_cpp.h, check_attn_mask_shape: a mask that requires grad (T5's learned position bias, say)
    # goes to the math backend, as does one that is not 2-D or 4-D broadcastable to [B, H, L, S] (an H100
    # with PyTorch 2.11 picked math for T5's position bias, memory-efficient for the same mask without grad)
    if attn_mask is None:
        return True
    if attn_mask.requires_grad:
        return False
    batch, heads, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if attn_mask.shape[-2] not in (lq, 1) or attn_mask.shape[-1] not in (lk, 1):
        return False
    if attn_mask.dim() == 2:
        return True
    return attn_mask.dim() == 4 and attn_mask.shape[0] in (1, batch) and attn_mask.shape[1] in (1, heads)


@CUDA_RULES.function(F.scaled_dot_product_attention)
def _attention_as_on_cuda(target, func, args, kwargs):
    # A fake CPU run asks the CPU's backend choice (flash for CPU without dropout, math with it); a GPU
    # picks flash or memory-efficient attention, which save only the output and a float32 logsumexp.
    # Their fake kernels are device-agnostic, so the CUDA choice is run through them directly.
    a = _arguments(_sdpa_signature, args, kwargs)
    q, k, v, mask, dropout_p = a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"]
    is_causal, scale, gqa = a["is_causal"], a["scale"], a["enable_gqa"]
    low = autocast_dtype()
    if low is not None:
        # Under AMP, CUDA autocast runs attention in low precision (autocast_mode.cpp: KERNEL_CUDA(
        # scaled_dot_product_attention, lower_precision_fp)), so the backend sees half inputs even when
        # the caller's are float32 (e.g. after rotary embeddings); this rule runs above autocast.
        q, k, v, mask = (cast(t, low) for t in (q, k, v, mask))
    backend = cuda_sdp_backend(q, k, v, mask, dropout_p, is_causal, gqa, target.gpu.capability)
    if backend == "flash":
        # the CPU flash kernel saves what CUDA's does: the output and logsumexp [B, H, L] in float32; like
        # CUDA's it takes grouped-query key/value heads as they are, without repeating them. attention.cpp
        # pads head dims to a multiple of 8 first (pad_last_dim<8>): the padded copies are what flash
        # saves, and the output is a slice of a padded one.
        head_dim = q.shape[-1]
        if head_dim % 8:
            q, k, v = (F.pad(t, (0, 8 - head_dim % 8)) for t in (q, k, v))
            scale = scale if scale is not None else head_dim ** -0.5
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]
        return out[..., :head_dim] if head_dim % 8 else out
    if backend == "efficient":
        if mask is not None:
            if mask.dtype == torch.bool:  # attention.cpp, convert_boolean_attn_mask: a float bias is made
                mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(mask.logical_not(), float("-inf"))
            # attention.cpp, preprocess_mask: a bias whose rows are not 8-element aligned is copied into a
            # padded one (pad_bias) before it is expanded to [B, H, L, S]
            if mask.stride(-1) != 1 or any(s % 8 for s in mask.stride()[:-1]):
                last = mask.shape[-1]
                mask = F.pad(mask, (0, 8 - last % 8))[..., :last]
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, needs_lse, dropout_p, is_causal, scale=scale)[0]
    if backend == "math":
        # not func(...): on CPU tensors that would ask the CPU's choice again, which may be flash
        extra = {"enable_gqa": True} if gqa else {}
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, mask, dropout_p, is_causal, scale=scale, **extra)[0]
    return func(*args, **kwargs)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@CUDA_RULES.function(F.multi_head_attention_forward)
def _multi_head_attention_as_on_cuda(target, func, args, kwargs):
    # nn.MultiheadAttention (torchvision's ViT, nn.Transformer) calls scaled_dot_product_attention from
    # inside F.multi_head_attention_forward, a Python function that a torch-function mode sees whole: while
    # a mode handles a call it is off, so the inner call would take the CPU's backend. The attention rule is
    # put in its place for the call (the body looks the name up in torch.nn.functional when it runs).
    original = F.scaled_dot_product_attention

    def attention(*a, **k):
        return _attention_as_on_cuda(target, original, a, k)

    F.scaled_dot_product_attention = attention
    try:
        return func(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = original


@CUDA_RULES.op(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _flash_backward_scratch(tracker, func, args, kwargs):
    # aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp, mha_bwd: after dq, dk, dv it allocates
    # float32 softmax_d [B, H, round128(Lq)] and dq_accum [B, round128(Lq), H, round(D, 32 up to 128, else
    # 64)], and for grouped key/value heads dk and dv expanded to every query head [B, Lk, H, D], summed into
    # dk and dv at the end. The expanded ones and dq_accum die when mha_bwd returns, softmax_d (returned
    # to _flash_attention_backward, which drops it) right after. Before all that, _flash_attention_backward
    # makes [B, L, H, D] contiguous copies of grad_out and out where they are not, kept until it returns.
    copies = _contiguous_copies(tracker, "flash attention backward: ", grad_out=args[0], out=args[4])
    out = func(*args, **kwargs)
    q, k, v = args[1], args[2], args[3]
    if out[1].shape != k.shape:  # PyTorch 2.5's fake kernel gives grouped key/value gradients every query head
        out = (out[0], torch.empty_like(k), torch.empty_like(v))
    tracker.record_outputs(out, func)
    scratch = flash_backward_scratch(*q.shape, kv_heads=k.shape[1], lk=k.shape[2], elem_size=q.element_size())
    softmax_d = tracker.allocate_scratch(scratch["float32 softmax_d"], "flash attention backward: float32 softmax_d")
    frees = [tracker.allocate_scratch(nbytes, f"flash attention backward: {name}")
             for name, nbytes in scratch.items() if name != "float32 softmax_d"]
    for free in reversed(frees):
        free()
    softmax_d()
    for free in reversed(copies):
        free()
    return out


def flash_backward_scratch(batch: int, heads: int, lq: int, d: int, kv_heads: int, lk: int,
                           elem_size: int) -> dict[str, int]:
    """The scratch of flash attention's backward (mha_bwd) in bytes, in the order it is allocated."""
    f32 = 4
    scratch = {"float32 softmax_d": batch * heads * _round_up(lq, 128) * f32,
               "float32 dq accumulator": batch * _round_up(lq, 128) * heads * _round_up(d, 32 if d <= 128 else 64) * f32}
    if kv_heads != heads:
        for name in ("dk", "dv"):
            scratch[f"{name} for every query head"] = batch * lk * heads * d * elem_size
    return scratch


def _contiguous_copies(tracker, label: str, **tensors) -> list:
    # the fused attention backward kernels take [B, L, H, D] views (transpose(1, 2) of what autograd
    # passes) and copy any that is not contiguous
    return [tracker.allocate_scratch(t.numel() * t.element_size(), f"{label}contiguous {name}")
            for name, t in tensors.items() if not t.transpose(1, 2).is_contiguous()]


def cudnn_attention_note() -> str:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    here = (f"torch {torch.__version__} here has cuDNN {cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}"
            if cudnn else f"torch {torch.__version__} here has no cuDNN")
    return ("On this GPU, PyTorch 2.10 and later run cuDNN attention where flash is predicted if their cuDNN is "
            f"newer than 9.15.0 (sdp_utils.cpp, check_prefer_cudnn_attention; {here}). It saves the same output "
            "and float32 softmax statistics; its backward workspace is taken to be flash's scratch (float32 "
            "accumulators, and per-query-head dk/dv for grouped key/value heads): on an H100 with PyTorch 2.11 and "
            "cuDNN 9.19 they were equal to the byte.")


@CUDA_RULES.op(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
def _flash_attention(tracker, func, args, kwargs):
    # sdp_utils.cpp, check_prefer_cudnn_attention: cuDNN attention goes first on sm90, sm100 and sm103
    if tracker.target.gpu.capability in ((9, 0), (10, 0), (10, 3)):
        tracker.note(cudnn_attention_note())
    return func(*args, **kwargs)


@CUDA_RULES.op(torch.ops.aten._scaled_dot_product_efficient_attention.default)
def _efficient_forward_scratch(tracker, func, args, kwargs):
    # attention.cu, _efficient_attention_forward: kernels for head dims over 128 accumulate the output in
    # a float32 [B, M, H, Kv] buffer when it is half, freed when the op returns
    q, v = args[0], args[2]
    batch, heads, m, k = q.shape
    out = func(*args, **kwargs)
    # its philox seed and offset are CPU tensors (Note [Seed and Offset Device]) outside CUDA graphs
    for host in out[2:4]:
        tracker.in_host_memory(host)
    tracker.record_outputs(out, func)
    accumulator = efficient_forward_accumulator_bytes(q.dtype, batch, heads, m, k, v.shape[-1])
    if accumulator:
        tracker.allocate_scratch(accumulator, "memory-efficient attention: float32 output accumulator")()
    return out


@CUDA_RULES.op(torch.ops.aten._scaled_dot_product_efficient_attention_backward.default)
def _efficient_backward_scratch(tracker, func, args, kwargs):
    # attention_backward.cu, _efficient_attention_backward (through _scaled_dot_product_efficient_attention_
    # backward_cuda, which hands it [B, M, H, K] views): a contiguous copy of grad_out unless it already is
    # one, then the gradients, a float32 delta [B, H, M] (computed with tensor ops, through a [B, M, H, Kv]
    # float32 product, for float32 kernels) and the kernel's workspace; delta dies when the kernel has run,
    # the workspace and the copy when the op returns. Sizes: memtrace/cutlass_attention.py.
    grad_out, q, k, v = args[0], args[1], args[2], args[3]
    dropout_p = args[9] if len(args) > 9 else kwargs.get("dropout_p", 0.0)
    batch, heads, m, head_dim = q.shape
    n, head_dim_v = k.shape[2], v.shape[-1]
    label = "memory-efficient attention backward: "
    frees = _contiguous_copies(tracker, label, grad_out=grad_out)
    out = func(*args, **kwargs)
    tracker.record_outputs(out, func)
    scratch = efficient_backward_scratch(q.dtype, tracker.target.gpu.capability, batch, heads, m, n, head_dim,
                                         head_dim_v, dropout=dropout_p > 0)
    temporaries = [tracker.allocate_scratch(nbytes, label + "float32 delta temporaries")
                   for nbytes in scratch.delta_temporaries]
    free_delta = tracker.allocate_scratch(scratch.delta_bytes, label + "float32 delta")
    for free in reversed(temporaries):
        free()
    if scratch.workspace_bytes:
        frees.append(tracker.allocate_scratch(scratch.workspace_bytes, label + "workspace"))
    free_delta()
    for free in reversed(frees):
        free()
    return out


@CUDA_RULES.op(torch.ops.aten.native_layer_norm.default)
def _layer_norm_statistics_in_float32(tracker, func, args, kwargs):
    # aten/src/ATen/native/cuda/layer_norm_kernel.cu, layer_norm_cuda: mean and rstd [M], kept for
    # backward, are of the input's accumulate type, float32 for 16-bit inputs; the CPU kernel, which the
    # fake run takes, makes them in the input's dtype (torch/_refs native_layer_norm says the same)
    out, mean, rstd = func(*args, **kwargs)
    if mean.dtype in (torch.float16, torch.bfloat16):
        mean, rstd = torch.empty_like(mean, dtype=torch.float32), torch.empty_like(rstd, dtype=torch.float32)
    return out, mean, rstd


CUDNN_CONVOLUTION_NOTE = (
    "cuDNN convolution workspaces are an estimate: each convolution's transient workspace is taken to be the "
    "size of its operands together (input, output and weight) for k x k kernels, three times that in float32 "
    "backward, half of it in backward for 1 x 1 kernels and for 16-bit depthwise ones, and none otherwise. Its "
    "real size depends on the engine cuDNN's heuristics pick at run time, which the shapes do not decide (on "
    "an H100 with cuDNN 9.19, float32 k x k backward took 1 to 3.6 times the operands; benchmarks/RESULTS.md). "
    "It is bounded by the free memory: when a workspace does not fit, PyTorch runs the next engine instead of "
    "failing (aten/src/ATen/native/cudnn/Conv_v8.cpp, try_plans), so it raises the measured peak on a card "
    "with memory to spare but does not by itself cause an out-of-memory error.")


def cudnn_workspace_estimate(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, groups: int,
                             backward: bool) -> int:
    """The estimated cuDNN workspace of one convolution (see CUDNN_CONVOLUTION_NOTE), in bytes, from the
    2,627 convolutions of the CUDA accuracy suite's CNNs measured on an H100 (cuDNN 9.19, PyTorch 2.11): a
    16-bit k x k convolution took exactly its operands' size in most calls (the engines keep transformed
    copies of them), float32 ones up to 3.6 times it in backward; pointwise ones mostly none forward and up
    to half of it backward; depthwise ones none, or half in 16-bit backward."""
    operands = (x.numel() + y.numel() + weight.numel()) * x.element_size()
    if groups > 1:
        ratio = 0.5 if backward and x.element_size() == 2 else 0.0
    elif all(k == 1 for k in weight.shape[2:]):
        ratio = 0.5 if backward else 0.0
    else:
        ratio = 3.0 if backward and x.element_size() == 4 else 1.0
    return int(ratio * operands)


@CUDA_RULES.op(torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
def _cudnn_convolution(tracker, func, args, kwargs):
    tracker.note(CUDNN_CONVOLUTION_NOTE)
    out = func(*args, **kwargs)
    backward = func is torch.ops.aten.convolution_backward.default
    x, weight, y = (args[1], args[2], args[0]) if backward else (args[0], args[1], out)
    groups = args[9] if backward else args[8]
    if x.dim() == 4 and x.is_floating_point():  # 2-D convolutions, the ones measured
        workspace = cudnn_workspace_estimate(x, weight, y, groups, backward)
        if workspace:
            tracker.allocate_scratch(workspace, "cuDNN workspace (estimate)", Category.WORKSPACE)()
    return out


# cuDNN's RNN buffers for every layer, direction, token and hidden unit, workspace and reserve together, as
# measured on an H100 (PyTorch 2.11, cuDNN 9.19) for a 2-layer LSTM of hidden 512 over 8 x 128 tokens:
# float32 48,562,496 B of workspace + 23,134,464 B of reserve, 16-bit 32,670,016 + 11,600,128 B, for
# 2 * 1024 * 512 of them (benchmarks/traces/lstm_lm.*). cudnnGetRNNTempSpaceSizes decides them, by the
# algorithm it picks: one configuration does not make a model, so they bound a note, not a prediction.
_CUDNN_RNN_BYTES_PER_UNIT = {4: 69, 2: 43}


def _cudnn_rnn_note(target, args, kwargs) -> str | None:
    """What the fake CPU run of a recurrent layer leaves out of a GPU run: cuDNN's RNN workspace (freed when
    the call returns) and reserve space (kept for backward), with a bound scaled from an H100 measurement."""
    packed = len(args) == 9 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point()
    x, hx = args[0], args[2 if packed else 1]
    layers, bidirectional = args[5 if packed else 4], args[8 if packed else 7]
    h0 = hx[0] if isinstance(hx, (tuple, list)) else hx
    if not isinstance(x, torch.Tensor) or not isinstance(h0, torch.Tensor):
        return None
    tokens = x.shape[0] if packed else x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    hidden = h0.shape[-1]
    dtype = autocast_dtype() or x.dtype
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    per_unit = _CUDNN_RNN_BYTES_PER_UNIT.get(size, _CUDNN_RNN_BYTES_PER_UNIT[4])
    bound = per_unit * layers * (2 if bidirectional else 1) * tokens * hidden
    return (f"Recurrent layers are traced through the CPU kernels; on a GPU cuDNN runs them and allocates an RNN "
            f"workspace (freed when the layer returns) and a reserve space (kept for backward) that are not in "
            f"this prediction. For this layer ({layers} layer(s){', bidirectional' if bidirectional else ''}, "
            f"hidden {hidden}, {tokens:,} tokens, {str(dtype).removeprefix('torch.')}) the prediction may be low by "
            f"up to about {format_bytes(bound)}: {per_unit} B per layer, direction, token and hidden unit, the two "
            f"buffers' size for an LSTM measured on an H100 (cuDNN 9.19); the real size is what cuDNN's algorithm "
            f"asks for on the GPU used.")


CUDA_RULES.note_on(_cudnn_rnn_note, torch._VF.lstm, torch._VF.gru, torch._VF.rnn_tanh, torch._VF.rnn_relu)


def _grouped_mm_output(mat_a, mat_b, offs, out_dtype: torch.dtype) -> torch.Tensor:
    """aten/src/ATen/native/GroupedMMUtils.h, create_grouped_gemm_output_tensor: [rows of a, columns of b]
    for 2-D x 3-D, one [rows, columns] block per group for 2-D x 2-D (the weight gradient), with the last
    dimension's stride padded to 16 bytes."""
    a_2d, b_2d = mat_a.dim() == 2, mat_b.dim() == 2
    if a_2d and b_2d:
        size = (offs.shape[0], mat_a.shape[0], mat_b.shape[1])
    elif a_2d:
        size = (mat_a.shape[0], mat_b.shape[-1])
    elif b_2d:
        size = (mat_a.shape[1], mat_b.shape[1])
    else:
        size = (mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    alignment = 16 // out_dtype.itemsize
    padded = -(-size[-1] // alignment) * alignment
    stride = (padded, 1) if a_2d != b_2d else (size[1] * padded, padded, 1)
    return torch.empty_strided(size, stride, dtype=out_dtype, device=mat_a.device)


def _grouped_mm_in_any_dtype(tracker, func, args, kwargs):
    # PyTorch's fake kernel for _grouped_mm (_meta_registrations.py, _meta_grouped_mm_common) checks the
    # dtypes of the CUDA bf16 fast path, but the CPU and CUDA kernels take float32 and float16 too
    # (_grouped_mm_validate_inputs) and run them through _grouped_mm_fallback: a loop of mm_out into
    # slices of the output, the only allocation. Hugging Face's mixture-of-experts layers call it in the
    # weights' dtype, float32 unless the model is cast.
    mat_a, mat_b = args[0], args[1]
    if mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16:
        return func(*args, **kwargs)
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    out_dtype = (args[4] if len(args) > 4 else kwargs.get("out_dtype")) or mat_a.dtype
    if mat_a.dtype != mat_b.dtype or mat_a.dtype not in (torch.float32, torch.float16):
        raise RuntimeError(f"_grouped_mm: expected float32, bfloat16 or float16 matrices of one dtype, got "
                           f"{mat_a.dtype} and {mat_b.dtype}")
    if (mat_a.dim() == 3 or mat_b.dim() == 3) and mat_a.shape[-1] != mat_b.shape[-2]:
        raise RuntimeError("_grouped_mm: contraction dimension of mat_a and mat_b must match")
    for mat in (mat_a, mat_b):
        _check_grouped_mm_strides(mat)
    return _grouped_mm_output(mat_a, mat_b, offs, out_dtype)


def _check_grouped_mm_strides(mat) -> None:
    # GroupedMMUtils.h, check_valid_strides_and_return_transposed: row- or column-major in the last two
    # dimensions, the other stride a multiple of 16 bytes
    rows, cols = mat.shape[-2:]
    row_stride, col_stride = mat.stride()[-2:]
    alignment = 16 // mat.element_size()
    if row_stride == 1 and col_stride >= max(1, rows):
        ok = col_stride % alignment == 0
    elif col_stride == 1 and row_stride >= max(1, cols):
        ok = row_stride % alignment == 0
    else:
        raise RuntimeError(f"_grouped_mm: invalid strides/sizes, got {mat.stride()} for strides and "
                           f"{tuple(mat.shape)} for sizes")
    if not ok:
        raise RuntimeError("_grouped_mm: strides should be multiple of 16 bytes")


def _grouped_mm_on_cuda(tracker, func, args, kwargs):
    # GroupedBlas.cpp, _grouped_mm_cuda: bf16 on sm90 and sm100 runs the CUTLASS grouped kernel (its small
    # argument buffer and workspace, 480 B and 66 KiB for 8 experts on an H100, are not modelled); any other
    # dtype or GPU runs _grouped_mm_fallback's loop of mm on cuBLAS, which takes the thread's cuBLAS
    # workspace on first use (measured on an H100: a float32 expert layer's first call allocated it)
    out = _grouped_mm_in_any_dtype(tracker, func, args, kwargs)
    bf16 = args[0].dtype == torch.bfloat16 and args[1].dtype == torch.bfloat16
    if not (bf16 and tracker.target.gpu.capability in ((9, 0), (10, 0))):
        cublas_handle_workspace(tracker)
    return out


if hasattr(torch.ops.aten, "_grouped_mm"):  # PyTorch 2.8 and later
    CPU_RULES.op(torch.ops.aten._grouped_mm.default)(_grouped_mm_in_any_dtype)
    CUDA_RULES.op(torch.ops.aten._grouped_mm.default)(_grouped_mm_on_cuda)


_GEMMS = [getattr(getattr(torch.ops.aten, name), overload) for name in (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "_addmm_activation")
    for overload in ("default", "out") if hasattr(getattr(torch.ops.aten, name), overload)]  # out: compiled graphs'
_ADDMM_OUT = torch.ops.aten.addmm.out


@CUDA_RULES.op(*_GEMMS)
def _cublas_workspace(tracker, func, args, kwargs):
    # aten/src/ATen/cuda/CublasHandlePool.cpp: the first cuBLAS call on a (handle, stream) pair allocates
    # a workspace through the caching allocator and keeps it. Handles are per thread, and the autograd
    # engine runs CUDA backward on its own device thread, so backward's first GEMM gets a second one
    # (measured on an H100, PyTorch 2.11: 32 MiB on each thread).
    out = func(*args, **kwargs)
    thread = cublas_handle_workspace(tracker)
    lt = cublaslt_workspace_bytes() if _uses_cublaslt(func, args, kwargs) else 0
    if lt and (2, 9) <= TORCH_VERSION:
        tracker.allocate_persistent(("cublaslt", thread), lt, Category.WORKSPACE, f"cuBLASLt workspace ({thread})")
    elif lt:
        tracker.allocate_scratch(lt, "cuBLASLt workspace")()
    return out


def cublas_handle_workspace(tracker) -> str:
    """The running thread's cuBLAS workspace, allocated at its first cuBLAS call and kept; returns the thread."""
    thread = "autograd thread" if tracker.where.phase is Phase.BACKWARD else "main thread"
    tracker.allocate_sized(cublas_workspace, (thread,), Category.WORKSPACE, persistent=("cublas", thread))
    return thread


def cublas_workspace(target, thread: str) -> list[tuple[str, int]]:
    """The workspace of ``thread``'s cuBLAS handle on ``target``'s GPU."""
    return [(f"cuBLAS workspace ({thread})", target.gpu.cublas_workspace_bytes())]


def cublaslt_workspace_bytes(environ=os.environ) -> int:
    """The workspace of a cuBLASLt matmul beside cuBLAS's (CublasHandlePool.cpp, getCUDABlasLtWorkspaceSize):
    CUBLASLT_WORKSPACE_SIZE KiB, 1 MiB by default. PyTorch 2.5-2.8 allocate it in every call and free it on
    return; 2.9-2.11 keep one per (handle, stream), like cuBLAS's; later releases, and
    TORCH_CUBLASLT_UNIFIED_WORKSPACE=1, run cuBLASLt in cuBLAS's workspace (pytorch#175879; the release
    it first ships in is taken to be 2.12). Measured on an H100 with PyTorch 2.11: 1,048,576 bytes, kept."""
    if TORCH_VERSION >= (2, 12) or environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE") == "1":
        return 0
    try:
        return int(environ.get("CUBLASLT_WORKSPACE_SIZE", 1024)) * 1024
    except ValueError:
        return 1024 * 1024


def _uses_cublaslt(func, args, kwargs) -> bool:
    # aten/src/ATen/native/cuda/Blas.cpp, addmm_out_cuda_impl: an out-of-place addmm (Linear with a bias,
    # GPT-2's Conv1D) or _addmm_activation runs cuBLASLt's bias epilogue when beta is 1, the dtype is real
    # floating point, mat2 is larger than 1 in both dims and the bias is a contiguous 1-D vector of mat2's
    # width (from 2.10 also a (1, n) one, and any 2-D bias with an activation). mm, bmm and the rest go to
    # cuBLAS unless the user prefers cuBLASLt (torch.backends.cuda.preferred_blas_library), not modelled.
    addmm, activation = torch.ops.aten.addmm.default, torch.ops.aten._addmm_activation.default
    if func not in (addmm, activation, _ADDMM_OUT) or os.environ.get("DISABLE_ADDMM_CUDA_LT") == "1":
        return False
    bias, mat2 = args[0], args[2]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    if beta != 1 or bias.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    if mat2.dim() != 2 or mat2.shape[0] <= 1 or mat2.shape[1] <= 1:
        return False
    if func is activation and bias.dim() == 2 and TORCH_VERSION >= (2, 10):
        return True
    vector = bias.dim() == 1 or (bias.dim() == 2 and bias.shape[0] == 1 and TORCH_VERSION >= (2, 10))
    return vector and bias.is_contiguous() and bias.shape[-1] == mat2.shape[1]


_REDUCTIONS = {torch.ops.aten.sum.default, torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.default,
               torch.ops.aten.mean.dim}


@CUDA_RULES.op(*_REDUCTIONS)
def _reduction_scratch(tracker, func, args, kwargs):
    # Reduce.cuh, gpu_reduce_kernel: a sum or mean split across several blocks per output stages partial
    # results in a buffer and counts blocks in semaphores, both allocated after the output and freed when
    # the op returns (sizes: memtrace/cuda_reduce.py). A bias gradient (a column sum over every token) is
    # the large case; the CPU kernels have no such buffers.
    out = func(*args, **kwargs)
    x = args[0]
    if x.is_complex() or x.numel() == 0:
        return out
    dims = None
    if func in (torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.dim):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = (args[2] if len(args) > 2 else kwargs.get("keepdim", False)) if dims is not None else False
    acc = 8 if (x.dtype == torch.float64 or not x.is_floating_point()) else 4  # arg_t: double, int64, float
    arguments = (tuple(x.shape), tuple(x.stride()), tuple(dims) if dims else None, x.element_size(), acc,
                 out.element_size(), bool(keepdim), 8 if x.element_size() == 2 else 4, x.storage_offset())
    for free in reversed(tracker.allocate_sized(reduction_scratch, arguments)):
        free()
    return out


def reduction_scratch(target, shape, strides, dims, itemsize, acc, out_itemsize, keepdim, vec,
                      offset) -> list[tuple[str, int]]:
    """The scratch ``gpu_reduce_kernel`` allocates for one reduction on ``target``'s GPU, (label, bytes) in
    allocation order."""
    gpu = target.gpu
    launches = reduce_launches(shape, strides, list(dims) if dims else None, itemsize, acc, out_itemsize,
                               keepdim=keepdim, sm_count=gpu.sm_count, max_threads_per_sm=gpu.threads_per_sm,
                               input_vec_size=vec, input_storage_offset=offset, legacy_25=TORCH_VERSION < (2, 6))
    if not launches:
        return []
    made = []
    if launches[0]["acc_buf_bytes"]:  # a 64-bit-indexed 16-bit reduction accumulates in float32 first
        made.append(("reduction: float32 accumulation buffer", launches[0]["acc_buf_bytes"]))
    buffer = max(launch["buffer_bytes"] for launch in launches)
    if buffer:
        made.append(("reduction: partial results across blocks", buffer))
        made.append(("reduction: block semaphores", max(launch["semaphore_bytes"] for launch in launches)))
    return made


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
    gpu: GPU | None = None
    notes: tuple[str, ...] = field(default=())
    # the autocast lists an AMP step is traced with, as a context manager (by default CPU autocast's own)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def target_for(device: str, gpu: GPU | None = None, alloc_conf: str | None = None) -> Target:
    if device == "cpu":
        return Target(name="cpu", rules=CPU_RULES, prepare_optimizer=_keep_optimizer_default,
                      host_resident=_nothing_on_host, allocator=ExactAllocator())
    gpu = gpu or lookup(DEFAULT_GPU)
    allocator, allocator_notes = cuda_allocator(alloc_conf)
    return Target(
        name="cuda",
        rules=CUDA_RULES,
        prepare_optimizer=_foreach_as_on_cuda,
        host_resident=_step_counter_on_host,
        allocator=allocator,
        gpu=gpu,
        autocast=cuda_autocast,
        notes=(
            f"CUDA target ({gpu.name}, {gpu.sm}): caching-allocator rounding and block reuse, foreach "
            "optimizers, host-side step counters, fused dropout masks, CUDA's autocast lists, the flash / "
            "memory-efficient / math attention choice and those kernels' scratch, float32 norm statistics and "
            "the fused RMSNorm, the reduction kernel's partial sums, and the cuBLAS and cuBLASLt workspaces "
            "(one per thread) are modelled.",
            *allocator_notes,
        ),
    )
