"""CUDA's autocast, applied to a step traced on CPU-side fake tensors.

A fake CPU run under AMP goes through CPU autocast, whose op lists differ from CUDA's: CUDA runs layer
norm, group norm, softmax, sums, ``exp``/``pow``/... in float32 (so their outputs, and what autograd saves,
are float32), while CPU runs them in the input's dtype and instead casts ``cross_entropy``'s input to a
float32 copy. ``cuda_autocast()`` replaces, for the duration of a trace, every CPU autocast kernel by one
that applies CUDA's policy for that op (or lets the op through, where CUDA has no rule for it), with the
weight-cast cache as CUDA keeps it. The lists are those of aten/src/ATen/autocast_mode.h (torch 2.14) and
the registrations in autocast_mode.cpp ``TORCH_LIBRARY_IMPL(aten, AutocastCUDA, m)``; ops the running
torch does not have are skipped. The replacement is process-wide while a trace runs: another thread using
CPU autocast at that moment would get CUDA's lists too.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

# AT_FORALL_LOWER_PRECISION_FP, plus cudnn_convolution(_transpose), registered for CUDA only
LOWER_PRECISION_FP = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr",
    "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
    "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    "cudnn_convolution", "cudnn_convolution_transpose",
)
# AT_FORALL_FP32
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
# AT_FORALL_FP32_SET_OPT_DTYPE: run in float32 by setting the op's own dtype argument when it is not given
FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
# AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE: the overload without a dtype, redispatched with float32 appended
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
# AT_FORALL_PROMOTE: run in the widest floating dtype of the arguments
PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add")
BANNED = ("binary_cross_entropy",)

_KEY = "AutocastCPU"
_EXCLUDE = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _overload(qualname: str):
    """``"pow.Scalar"`` -> torch.ops.aten.pow.Scalar, or None where the running torch lacks it."""
    name, _, overload = qualname.partition(".")
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


def _eligible(t) -> bool:
    # autocast_mode.h, is_eligible: a defined floating-point tensor of the autocast device, not float64
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _lower_dtype() -> torch.dtype:
    """CPU autocast's low-precision dtype, whether or not a region is open (inside a kernel the autocast
    key is excluded, which reads as disabled)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype("cpu")
    return torch.get_autocast_cpu_dtype()


def autocast_dtype() -> torch.dtype | None:
    """The low-precision dtype of the autocast region the traced step is in (AMP is traced under CPU
    autocast), or None outside one."""
    enabled = torch.is_autocast_enabled("cpu") if hasattr(torch, "get_autocast_dtype") else \
        torch.is_autocast_cpu_enabled()
    return _lower_dtype() if enabled else None


def cast(value, dtype: torch.dtype):
    """autocast's cast of one argument outside the weight cache: eligible tensors to ``dtype``."""
    return value.to(dtype) if _eligible(value) and value.dtype != dtype else value


class _Policy:
    """Casts as autocast_mode.h's cached_cast does, with its weight cache: the low-precision copy of an
    fp32 leaf that requires grad is kept until the outermost autocast region exits."""

    def __init__(self):
        self.cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def cast(self, value, dtype: torch.dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(v, dtype) for v in value)
        if (_eligible(value) and value.dtype == torch.float32 and dtype == _lower_dtype() and value.requires_grad
                and value.is_leaf and not value._is_view() and torch.is_autocast_cache_enabled()):
            hit = self.cache.get(id(value))
            if hit is not None and hit[0]() is value:
                return hit[1]
            out = value.to(dtype)
            self.cache[id(value)] = (weakref.ref(value), out)
            return out
        return cast(value, dtype)

    def cast_call(self, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
        """Cast every argument, last first: the wrappers cast their C++ arguments in one call expression,
        which GCC evaluates right to left; the order decides which copy the allocator sees first."""
        new_kwargs = {k: self.cast(kwargs[k], dtype) for k in reversed(list(kwargs))}
        new_args = [self.cast(a, dtype) for a in reversed(args)][::-1]
        return tuple(new_args), {k: new_kwargs[k] for k in kwargs}

    def clear(self) -> None:
        self.cache.clear()


def _kernel(op, policy: str, state: _Policy):
    schema = op._schema
    names = [a.name for a in schema.arguments]
    dtype_at = names.index("dtype") if "dtype" in names else None
    appended = _overload(FP32_APPEND_DTYPE[str(op).split("aten.", 1)[1].removesuffix(".default")]) \
        if policy == "fp32_append_dtype" else None

    def lower(*args, **kwargs):
        dtype = _lower_dtype()
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            args, kwargs = state.cast_call(args, kwargs, dtype)
            return op(*args, **kwargs)

    def fp32(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            args, kwargs = state.cast_call(args, kwargs, torch.float32)
            return op(*args, **kwargs)

    def set_opt_dtype(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            if not (args and _eligible(args[0])):
                return op(*args, **kwargs)
            given = args[dtype_at] if len(args) > dtype_at else kwargs.get("dtype")
            if given is None:
                if len(args) > dtype_at:
                    args = args[:dtype_at] + (torch.float32,) + args[dtype_at + 1:]
                else:
                    kwargs = {**kwargs, "dtype": torch.float32}
                given = torch.float32
            if (schema.name in ("aten::softmax", "aten::log_softmax") and args[0].dtype == torch.float16
                    and given == torch.float32):
                # SoftMax.cpp, softmax/log_softmax: on CUDA a half input with dtype=float runs the
                # half-to-float kernel, with no float32 copy of the input
                fused = torch.ops.aten._softmax if schema.name == "aten::softmax" else torch.ops.aten._log_softmax
                return fused(args[0], args[1] if len(args) > 1 else kwargs["dim"], True)
            return op(*args, **kwargs)

    def append_dtype(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            if not (args and _eligible(args[0])):
                return op(*args, **kwargs)
            return appended(*args, **kwargs, dtype=torch.float32)

    def promote(*args, **kwargs):
        tensors = [t for t in list(args) + list(kwargs.values()) if _eligible(t)]
        widest = None
        for t in tensors:
            widest = t.dtype if widest is None else torch.promote_types(widest, t.dtype)
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            if widest is None:
                return op(*args, **kwargs)
            args, kwargs = state.cast_call(args, kwargs, widest)
            return op(*args, **kwargs)

    def banned(*args, **kwargs):
        # autocast_mode.cpp, binary_cross_entropy_banned: the message a CUDA run stops with
        raise RuntimeError(
            "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast. Many models "
            "use a sigmoid layer right before the binary cross entropy layer. In this case, combine the two "
            "layers using torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss.")

    return {"lower_precision_fp": lower, "fp32": fp32, "fp32_set_opt_dtype": set_opt_dtype,
            "fp32_append_dtype": append_dtype, "promote": promote, "banned": banned}[policy]


def _cuda_policies() -> dict[str, str]:
    policies = {}
    for names, policy in ((LOWER_PRECISION_FP, "lower_precision_fp"), (FP32, "fp32"),
                          (FP32_SET_OPT_DTYPE, "fp32_set_opt_dtype"), (tuple(FP32_APPEND_DTYPE), "fp32_append_dtype"),
                          (PROMOTE, "promote"), (BANNED, "banned")):
        for name in names:
            policies[name] = policy
    return policies


@contextlib.contextmanager
def cuda_autocast():
    """While open, CPU autocast behaves as CUDA autocast. Its weight cache is dropped where PyTorch drops
    its own: ``torch.autocast.__exit__`` calls ``torch.clear_autocast_cache()`` when the outermost region
    exits, the step's own or one that activation checkpointing enters to recompute a block."""
    state = _Policy()
    clear_torch_cache = torch.clear_autocast_cache

    def clear_both() -> None:
        state.clear()
        clear_torch_cache()

    lib = torch.library.Library("aten", "IMPL")
    cpu_listed = {name.removeprefix("aten::") for name in torch._C._dispatch_get_registrations_for_dispatch_key(_KEY)
                  if name.startswith("aten::")}  # other libraries' (torchvision's) register CUDA's alike
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": intended
        for name, policy in _cuda_policies().items():
            op = _overload(name)
            if op is None or (policy == "fp32_append_dtype" and _overload(FP32_APPEND_DTYPE[name]) is None):
                continue
            lib.impl(name.removesuffix(".default"), _kernel(op, policy, state), _KEY)
            cpu_listed.discard(name)
        for name in cpu_listed:  # CPU has a rule for it and CUDA has none: let it through
            lib.impl(name, torch.library.fallthrough_kernel, _KEY)
    torch.clear_autocast_cache = clear_both
    try:
        yield
    finally:
        torch.clear_autocast_cache = clear_torch_cache
        state.clear()
        if hasattr(lib, "_destroy"):
            lib._destroy()
        else:  # torch < 2.3
            del lib
