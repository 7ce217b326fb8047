"""bitsandbytes on fake tensors: 4-bit weights (QLoRA's base model) and the 8-bit and paged optimizers.

A 4-bit weight is a ``bitsandbytes.nn.Params4bit``: the packed values (two a byte, in ``quant_storage``) and a
``QuantState`` holding the block-wise statistics (float32 ``absmax`` per block of ``blocksize`` values; with
double quantisation ``compress_statistics``, those absmax quantised again to uint8 with a float32 ``offset``
and a second state of float32 absmax per 256 with its copy of the 256-entry dynamic map), and the 16-entry code
of nf4 or fp4. ``Params4bit`` cannot wrap a fake tensor (both are tensor subclasses), so the fake copy is a fake tensor of
a class of the same name (PEFT tells 4-bit weights by their class's name, for DoRA) carrying a fake
``QuantState``. A weight not quantised yet (``bnb_quantized=False``: a model built on the meta device and its
Linears replaced, as ``transformers`` does for a ``BitsAndBytesConfig`` before it loads the checkpoint) is
quantised on fake tensors by bitsandbytes' own ``quantize_4bit``, as moving it to the GPU would.

The step then runs bitsandbytes' Python (``Linear4bit.forward``, ``matmul_4bit``, ``MatMul4Bit``) on fake
tensors; its custom ops have fake kernels that make their outputs. What a kernel allocates beside its output
is a rule per target, from bitsandbytes' own kernels (bitsandbytes 0.50, ``backends/*/ops.py``):

- ``gemm_4bit`` on CUDA (``backends/cuda/ops.py``): for more than ``_gemm_4bit_custom_max_m`` rows (1536), an
  inner dimension not a multiple of the block size, or where bitsandbytes' per-architecture heuristic says so,
  ``_dequant_linear_fallback``: the dequantised absmax (float32 per block, twice when nested), the whole
  dequantised weight [N, K] in the input's dtype, then ``F.linear`` (cuBLAS), all freed when it returns;
  otherwise its fused kernel, which allocates the output only.
- ``gemm_4bit`` on the CPU (``backends/default/ops.py``, ``_gemm_4bit_default_impl``): the same dequantise and
  ``F.linear`` with PyTorch ops, run as they are; so are the CPU optimizer updates (``backends/cpu/ops.py``).
- the optimizer updates on CUDA update their state in place and allocate nothing, as the fake kernels do.

bitsandbytes' optimizers keep 8-bit states as uint8 with float32 absmax per block of 256 (float32 states for
parameters under ``min_8bit_size``); a paged optimizer's large states live in CUDA unified memory, outside what
``max_memory_allocated`` counts (``prepare_optimizer``).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

from .options import Category

_NOT_SET = object()


def is_4bit(p) -> bool:
    """A bitsandbytes 4-bit weight (``Params4bit``)."""
    return type(p).__name__ == "Params4bit" and hasattr(p, "quant_type") and hasattr(p, "blocksize")


def uses_bitsandbytes(model: torch.nn.Module) -> bool:
    return any(is_4bit(p) for p in model.parameters())


@functools.cache
def _fake_params4bit_class():
    from torch._subclasses.fake_tensor import FakeTensor

    # PEFT (dequantize_bnb_weight) and others tell a 4-bit weight by its class's name
    return type("Params4bit", (FakeTensor,), {"__module__": __name__, "__qualname__": "Params4bit"})


# a QuantState's tensors, with the names bitsandbytes gives them in a state dict (a nested state's prefixed)
_FIELDS = (("absmax", "absmax"), ("code", "quant_map"), ("offset", "offset"))


def _state_tensors(state, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a bitsandbytes QuantState, nested state included, as (name, tensor), in the order
    quantize_4bit makes them."""
    out = [(prefix + label, getattr(state, field)) for field, label in _FIELDS
           if isinstance(getattr(state, field, None), torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _state_tensors(nested, "nested_")
    return out


def _fake_state(state, memo: dict, make):
    """A copy of ``state`` whose tensors are fake (``make``), tensors shared between states made once."""
    if id(state) in memo:
        return memo[id(state)]
    fake = copy.copy(state)
    memo[id(state)] = fake
    for field, _ in _FIELDS:
        t = getattr(state, field, None)
        if isinstance(t, torch.Tensor):
            if id(t) not in memo:
                memo[id(t)] = make(t)
            setattr(fake, field, memo[id(t)])
    nested = getattr(state, "state2", None)
    if nested is not None:
        fake.state2 = _fake_state(nested, memo, make)
    return fake


def fake_4bit(p, memo: dict, tracker, make, dtype: torch.dtype | None) -> torch.Tensor:
    """The fake copy of 4-bit weight ``p``: its packed values and statistics, accounted as parameters, in the
    order bitsandbytes makes them. ``make(t)`` makes a fake tensor like ``t``; ``dtype`` is the dtype the model's
    floating-point weights are converted to, which a weight not quantised yet is quantised from."""
    import bitsandbytes as bnb

    state = p.__dict__.get("quant_state")
    if getattr(p, "bnb_quantized", False) and state is not None:
        fake_state = _fake_state(state, memo, make)
        data = make(p)  # its metadata: ``p.data`` would be an op on a real tensor
    else:
        maps = bnb.functional.name2qmap
        with tracker.hidden():  # the float weight quantised on its way to the device is not the step's
            # bitsandbytes' cached dynamic map, whose values are computed on the host, stood in for by a tensor of
            # its size; each nested state keeps a copy. The cache itself (1 KiB kept on the device once) is left out
            if _DYNAMIC_MAP not in memo:
                memo[_DYNAMIC_MAP] = torch.empty(_dynamic_map_size(True), dtype=torch.float32)
            weight = torch.empty(tuple(p.shape), dtype=dtype if dtype is not None and p.is_floating_point() else p.dtype)
            before = maps.get("dynamic", _NOT_SET)
            maps["dynamic"] = memo[_DYNAMIC_MAP]
            try:
                data, fake_state = bnb.functional.quantize_4bit(
                    weight, blocksize=p.blocksize, compress_statistics=p.compress_statistics,
                    quant_type=p.quant_type, quant_storage=p.quant_storage)
            finally:
                if before is _NOT_SET:
                    del maps["dynamic"]
                else:
                    maps["dynamic"] = before
        stats = [t for _, t in _state_tensors(fake_state)]
        for t in stats[:1] + [data] + stats[1:]:  # the absmax, then the packed values, then the rest
            tracker.adopt(t, Category.PARAMETER, "bitsandbytes quantize_4bit")
        if state is not None:
            memo[id(state)] = fake_state
    fake = torch.nn.Parameter(data, requires_grad=False)
    fake.__class__ = _fake_params4bit_class()
    for name in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(fake, name, getattr(p, name))
    fake.quant_state = fake_state
    fake.bnb_quantized = True
    fake.module = None
    return fake


_DYNAMIC_MAP = "memtrace: bitsandbytes dynamic map"  # a key of the fake copy's memo (whose others are ids)


@functools.cache
def _dynamic_map_size(signed: bool) -> int:
    """The values of bitsandbytes' 8-bit dynamic quantisation map (``create_dynamic_map``), made on real tensors."""
    import bitsandbytes as bnb
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # neither fake nor traced: a computation on the host
        return bnb.functional.create_dynamic_map(signed=signed).numel()


def note(target) -> str:
    import bitsandbytes as bnb

    where = ("the CPU backend's kernels (a 4-bit matmul dequantises its weight with PyTorch ops)" if target.name == "cpu"
             else f"on CUDA, each gemm_4bit's choice between its fused kernel and dequantising the whole weight for "
                  f"cuBLAS (the dequantised weight is then a temporary of the matmul) made by bitsandbytes' own "
                  f"dispatch for the {target.gpu.name} ({target.gpu.sm}, {target.gpu.sm_count} SMs)")
    return (f"bitsandbytes {bnb.__version__} 4-bit weights: the packed values and their block-wise statistics are "
            f"parameters, and the step runs bitsandbytes' own Linear4bit, matmul_4bit and backward (which dequantises "
            f"each weight); {where}.")


def refuse_unsupported(model: torch.nn.Module) -> None:
    """Raises for quantised weights the trace would get wrong: an 8-bit ``Int8Params`` loses its scales on a
    fake copy, and its matmul takes a CPU-only path there."""
    for name, p in model.named_parameters():
        if type(p).__name__ == "Int8Params":
            raise ValueError(f"{name} is a bitsandbytes 8-bit weight (Linear8bitLt): 8-bit base weights are not "
                             "predicted yet; 4-bit ones (Linear4bit, load_in_4bit) are")


def after_copy(model: torch.nn.Module, target=None) -> None:
    """Settles what a copy of a model with bitsandbytes layers holds: each Linear4bit's ``quant_state`` is its
    weight's, as bitsandbytes keeps it (``Params4bit.__deepcopy__`` copies the state apart from the module's);
    on a CUDA target the CPU-only inference repacking (for AVX512-BF16 CPUs) is off."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if is_4bit(weight) and hasattr(module, "quant_state"):
            module.quant_state = weight.quant_state
            if target is not None and target.name != "cpu" and hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def _seen_by(tracker):
    """Ops run inside are the tracker's again (a dispatch mode is off while it handles an op)."""
    with tracker:
        yield


def _gemm_args(args, kwargs) -> dict:
    names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code",
             "absmax_offset")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for name in names[6:]:
        bound.setdefault(name, None)
    return bound


# bitsandbytes' CPU kernels written with PyTorch ops, run as they are on the CPU target (the kernels that call its
# C library allocate their output only, as the fake kernels do): (module, function) by op
_CPU_KERNELS = {
    "gemm_4bit": ("bitsandbytes.backends.default.ops", "_gemm_4bit_default_impl"),
    "optimizer_update_32bit": ("bitsandbytes.backends.cpu.ops", "_optimizer_update_32bit_cpu"),
    "optimizer_update_8bit_blockwise": ("bitsandbytes.backends.cpu.ops", "_optimizer_update_8bit_blockwise_cpu"),
}


def _cpu_kernel(kernel):
    def run(tracker, func, args, kwargs):
        with _seen_by(tracker):
            return kernel(*args, **kwargs)
    return run


def cuda_gemm_4bit_kernel(gpu, dtype: torch.dtype, m: int, n: int, k: int, blocksize: int) -> bool | None:
    """Whether bitsandbytes' ``gemm_4bit`` runs its fused kernel (True) or dequantises the weight and calls
    cuBLAS (False) on ``gpu`` for an [m, k] input and an [n, k] weight: bitsandbytes' own dispatch
    (backends/cuda/ops.py) asked with the card's multiprocessor count and compute capability. None where that
    module cannot be imported here (a CPU-only PyTorch build)."""
    try:
        from bitsandbytes.backends.cuda import ops
    except Exception:
        return None
    choose = getattr(ops, "_gemm_4bit_use_custom_fn", None)
    limit = getattr(ops, "_gemm_4bit_custom_max_m", None)
    if choose is None or limit is None:
        return None
    if m > limit or k % blocksize != 0:
        return False
    props = ops._gpu_dispatch_props
    ops._gpu_dispatch_props = lambda index: (gpu.sm_count, *gpu.capability)
    try:
        return bool(getattr(choose, "__wrapped__", choose)(None, dtype, m, n, k))
    finally:
        ops._gpu_dispatch_props = props


def _gemm_4bit_on_cuda(tracker, func, args, kwargs):
    # backends/cuda/ops.py, the gemm_4bit kernel registered for "cuda"
    a = _gemm_args(args, kwargs)
    A, n = a["A"], a["shapeB"][0]
    k = A.shape[-1]
    m = A.numel() // k if k else 0
    fused = cuda_gemm_4bit_kernel(tracker.target.gpu, A.dtype, m, n, k, a["blocksize"])
    if fused is None:
        fused = False
        tracker.note("bitsandbytes' CUDA dispatch could not be imported here (a CPU-only PyTorch build): every 4-bit "
                     "matmul is taken to dequantise its weight before cuBLAS, which allocates more than its fused "
                     "kernel would; the peak is an upper bound.")
    with _seen_by(tracker):
        if fused:  # _gemm_4bit_kernel_impl: a contiguous input, the output, a float32 offset
            A = A.contiguous()
            out = torch.empty((*A.shape[:-1], n), dtype=A.dtype, device=A.device)
            if a["absmax_offset"] is not None:
                a["absmax_offset"].to(dtype=torch.float32)
            return out
        # _dequant_linear_fallback: all of it lives until it returns
        held = []
        if a["absmax_8bit"] is not None:
            held.append(torch.empty_like(a["absmax_8bit"], dtype=torch.float32))  # absmax_dq
            held.append(held[-1] + a["absmax_offset"])  # absmax
        held.append(torch.empty(tuple(a["shapeB"]), dtype=A.dtype, device=A.device))  # B_dq
        return torch.nn.functional.linear(A, held[-1], a["bias"])


def op_rules(target) -> dict:
    """The dispatch rules for bitsandbytes' ops on ``target`` (bitsandbytes is imported)."""
    import importlib

    ops = getattr(torch.ops, "bitsandbytes", None)
    rules = {}
    if target.name == "cpu":
        for name, (module, function) in _CPU_KERNELS.items():
            op = getattr(ops, name, None)
            try:
                kernel = getattr(importlib.import_module(module), function)
            except (ImportError, AttributeError):
                continue
            if op is not None:
                rules[op.default] = _cpu_kernel(kernel)
    else:
        gemm = getattr(ops, "gemm_4bit", None)
        if gemm is not None:  # before gemm_4bit, matmul_4bit dequantised with ops the tracer sees
            rules[gemm.default] = _gemm_4bit_on_cuda
        # the CUDA optimizer kernels update the state in place and allocate nothing: the fake kernels' way
    return rules


def is_bitsandbytes_optimizer(optimizer) -> bool:
    return any(c.__module__.startswith("bitsandbytes.") and c.__name__ == "Optimizer8bit"
               for c in type(optimizer).__mro__)


PAGED_MIN_NUMEL = 100_000  # Optimizer8bit.get_state_buffer: smaller states are never paged


def _fill_qmap(self):
    # Optimizer8bit.fill_qmap: the 8-bit maps, computed from values read on the host (which fake tensors cannot
    # give), as tensors of their size; the run copies them to the device at its first step
    self.name2qmap["dynamic"] = torch.empty(_dynamic_map_size(True), dtype=torch.float32)
    self.name2qmap["udynamic"] = torch.empty(_dynamic_map_size(False), dtype=torch.float32)


@contextlib.contextmanager
def building_optimizers():
    """While an optimizer is built on fake tensors: bitsandbytes' optimizers make their quantisation maps the
    way fake tensors can."""
    import sys

    module = sys.modules.get("bitsandbytes.optim.optimizer")
    base = getattr(module, "Optimizer8bit", None)
    if base is None or not hasattr(base, "fill_qmap"):
        yield
        return
    plain = base.fill_qmap
    base.fill_qmap = _fill_qmap
    try:
        yield
    finally:
        base.fill_qmap = plain


def prepare_optimizer(optimizer, tracker, target) -> None:
    """A bitsandbytes optimizer as on ``target``: on CUDA a paged optimizer keeps each state of
    ``PAGED_MIN_NUMEL`` values or more in CUDA unified memory (``F.get_paged``, cudaMallocManaged), outside
    PyTorch's caching allocator, so ``max_memory_allocated`` never counts it; on the CPU bitsandbytes falls
    back to ordinary tensors, as the fake run does."""
    if not getattr(optimizer, "is_paged", False):
        return
    if target.name == "cpu":  # bitsandbytes runs it unpaged there (and warns, once per optimizer, that it does)
        optimizer._cpu_paged_warned = True
        tracker.note("Paged optimizer on the CPU: bitsandbytes keeps its states as ordinary tensors there, as "
                     "predicted; on CUDA its large states would live in unified memory.")
        return

    def get_state_buffer(p, dtype=torch.float32):
        if p.numel() < PAGED_MIN_NUMEL:
            return torch.zeros_like(p, dtype=dtype)
        with tracker.hidden():
            buffer = torch.zeros_like(p, dtype=dtype)
        tracker.in_host_memory(buffer)
        tracker.note("Paged optimizer: its states of 100,000 values or more live in CUDA unified memory "
                     "(cudaMallocManaged), which max_memory_allocated does not count; they are left out of the "
                     "peak. The driver pages them onto the GPU while the optimizer steps, using memory beside "
                     "PyTorch's, and evicts them under pressure.")
        return buffer

    optimizer.get_state_buffer = get_state_buffer
    optimizer.fill_qmap = _fill_qmap.__get__(optimizer)


def numel(p: torch.Tensor) -> int:
    """The values a parameter holds: a 4-bit weight's unpacked count (its quantised shape), else ``numel()``."""
    state = getattr(p, "quant_state", None) if is_4bit(p) else None
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def statistics(name: str, p) -> list[tuple[str, torch.Tensor]]:
    """A 4-bit weight's statistics as (name, tensor), named after the weight (``q_proj.weight.absmax``,
    ``...nested_absmax``), each tensor once."""
    if not is_4bit(p) or getattr(p, "quant_state", None) is None:
        return []
    return [(f"{name}.{label}", t) for label, t in _state_tensors(p.quant_state)]


def quantize_4bit(model: torch.nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype | None = torch.bfloat16, weight_dtype: torch.dtype | None = None,
                  quant_storage: torch.dtype = torch.uint8, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replaces ``model``'s ``nn.Linear`` layers, in place, by bitsandbytes ``Linear4bit`` holding their weights,
    as ``transformers`` does for ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
    bnb_4bit_quant_storage=quant_storage)`` (``replace_with_bnb_linear``), skipping modules whose name or last
    name part is in ``skip`` (transformers keeps the output head unquantised). ``weight_dtype`` is the dtype
    the checkpoint's weights arrive in (``torch_dtype``), which the statistics and the dequantised weight
    keep; by default each weight's own. Real weights are quantised here, on their device (bitsandbytes has a
    CPU backend); weights on the meta device are quantised on fake tensors when memtrace traces the step.
    Returns ``model``."""
    import bitsandbytes as bnb

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: bitsandbytes' 4-bit types are 'nf4' and 'fp4'")
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or child_name in skip or full in skip:
                continue
            weight = child.weight
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=double_quant,
                                    quant_type=quant_type, quant_storage=quant_storage, device="meta")
            data = weight.detach()
            if weight_dtype is not None and data.dtype != weight_dtype:
                data = data.to(weight_dtype)
            new.weight = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=double_quant,
                                           quant_type=quant_type, quant_storage=quant_storage, module=new)
            if child.bias is not None:
                new.bias = child.bias
            if not weight.is_meta:
                new.weight = new.weight.to(weight.device)  # Params4bit quantises as it moves
            new.train(child.training)
            setattr(module, child_name, new)
            replaced += 1
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantise (skipped: {', '.join(skip)})")
    return model
