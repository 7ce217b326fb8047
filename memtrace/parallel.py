"""Per-rank memory of sharded and data-parallel training: PyTorch's own parallel code runs on the fake copy.

``parallel={"fsdp": 8}`` applies ``fully_shard`` to the fake copy's repeated blocks and its root, on a CPU
device mesh over a fake process group (collectives complete at once and move no data), so the sharded
parameters and their padding, the all-gather and reduce-scatter buffers, the mixed-precision copies and
the optimizer's sharded state are what PyTorch itself allocates on one rank. ``"tp"`` runs
``parallelize_module`` first (the model's own Hugging Face plan, or ``tp_plan=``); ``"ddp"`` wraps the
fake copy in ``DistributedDataParallel``, whose reducer allocates and fills its gradient buckets, with
``ZeroRedundancyOptimizer`` for ``"zero": 1``. The step is traced as that rank sees it; ranks that hold
different memory (uneven dimensions, the rank holding the remainder, ZeRO's partitions) are traced too,
and the largest is the headline.

The process group exists only while a trace runs: when the user's process already has one, the state of
``torch.distributed`` is kept aside and put back afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .options import Category

_FSDP_KEYS = ("fsdp", "replicate", "reshard_after_forward", "mp_policy", "units")
# DistributedDataParallel's keyword arguments that decide what a rank holds
DDP_KEYS = ("bucket_cap_mb", "gradient_as_bucket_view", "broadcast_buffers", "zero")
_TP_KEYS = ("tp", "tp_plan")
_KEYS = _FSDP_KEYS + _TP_KEYS + ("ddp",) + DDP_KEYS
# Hugging Face's tensor-parallel plan names (a model's ``_tp_plan``, its config's ``base_model_tp_plan``), as
# torch's ParallelStyle: (style, its keyword arguments, as placement names)
HF_STYLES = {
    "colwise": ("ColwiseParallel", {}),
    "rowwise": ("RowwiseParallel", {}),
    "colwise_rep": ("ColwiseParallel", {"output_layouts": "Replicate"}),
    "colwise_gather_output": ("ColwiseParallel", {"output_layouts": "Replicate"}),
    "rowwise_rep": ("RowwiseParallel", {"input_layouts": "Replicate"}),
    "embedding_rowwise": ("RowwiseParallel", {"input_layouts": "Replicate"}),
    "sequence_parallel": ("SequenceParallel", {}),
}


@dataclass(frozen=True)
class Parallel:
    """How the model is parallelized: the mesh and the FSDP2 settings, or the user's own plan."""

    fsdp: int = 1
    replicate: int = 1  # HSDP: replicas of the FSDP group, gradients all-reduced across them
    reshard_after_forward: bool | int = True
    mp_policy: Any = None  # FSDP2's MixedPrecisionPolicy
    units: tuple[str, ...] = ()  # the modules fully_shard wraps before the root (their names)
    plan: Callable | None = field(default=None, compare=False)  # the user's fn(model, mesh) -> model
    world: int = 1  # world size of a user's plan
    tp: int = 1  # tensor parallel degree: the innermost mesh dimension
    tp_plan: tuple[tuple[str, Any], ...] = field(default=(), compare=False)  # (module pattern, ParallelStyle)
    tp_source: str = ""  # where the plan came from, for the report
    ddp: int = 1  # DistributedDataParallel over this many ranks (instead of FSDP)
    ddp_options: tuple[tuple[str, Any], ...] = ()  # DDP's keyword arguments (DDP_KEYS), as (name, value)
    zero: bool = False  # ZeroRedundancyOptimizer over the DDP ranks (ZeRO stage 1)

    @property
    def world_size(self) -> int:
        if self.plan is not None:
            return self.world
        return self.ddp if self.ddp > 1 else self.fsdp * self.replicate * self.tp

    @property
    def shards(self) -> bool:
        """Parameters are sharded (FSDP2, or a plan of DTensors): a rank never holds the whole model."""
        return self.ddp == 1

    @property
    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        if self.plan is not None:
            return (self.world,), ("dp",)
        dims = [("replicate", self.replicate)] if self.replicate > 1 else []
        if self.fsdp > 1 or self.tp == 1:
            dims.append(("fsdp", self.fsdp))
        if self.tp > 1:
            dims.append(("tp", self.tp))
        return tuple(n for _, n in dims), tuple(d for d, _ in dims)

    def describe(self) -> str:
        if self.ddp > 1:
            extras = ", ".join(f"{k}={v}" for k, v in self.ddp_options)
            return (f"DDP {self.ddp}" + (" + ZeroRedundancyOptimizer" if self.zero else "")
                    + (f" ({extras})" if extras else ""))
        if self.plan is not None:
            return f"{getattr(self.plan, '__name__', type(self.plan).__name__)} over {self.world} ranks"
        text = f"HSDP {self.replicate} x FSDP {self.fsdp}" if self.replicate > 1 else f"FSDP {self.fsdp}"
        if self.tp > 1:
            text = f"TP {self.tp}" if self.fsdp * self.replicate == 1 else f"{text} x TP {self.tp}"
        extras = []
        if self.reshard_after_forward is not True:
            extras.append(f"reshard_after_forward={self.reshard_after_forward}")
        if self.mp_policy is not None:
            extras.append(_describe_mp(self.mp_policy))
        return text + (f" ({', '.join(extras)})" if extras else "")


def _describe_mp(policy) -> str:
    parts = [f"{k}={str(getattr(policy, k)).removeprefix('torch.')}" for k in ("param_dtype", "reduce_dtype",
                                                                               "output_dtype")
             if getattr(policy, k, None) is not None]
    return "mixed precision " + (", ".join(parts) if parts else "(defaults)")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"parallel={{'{key}': {value!r}}}: {key} must be an int >= 1")
    return value


def _mp_policy(value: Any):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if value is None or isinstance(value, MixedPrecisionPolicy):
        return value
    if isinstance(value, Mapping):
        from .options import _parse_dtype

        known = {"param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs"}
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ValueError(f"parallel= mp_policy has {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        kw = {k: (_parse_dtype(f"mp_policy {k}", v) if k.endswith("dtype") and v is not None else v)
              for k, v in value.items()}
        return MixedPrecisionPolicy(**kw)
    raise TypeError(f"parallel= mp_policy={value!r} must be a torch.distributed.fsdp.MixedPrecisionPolicy or a dict "
                    "of its fields (param_dtype, reduce_dtype, output_dtype, cast_forward_inputs)")


def _check_available(what: str = "FSDP2 on a CPU device mesh") -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("parallel= needs torch.distributed, which this PyTorch build does not have")
    try:  # PyTorch 2.6 has it, and the fake tensor implementations of the c10d collectives
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise RuntimeError(f"parallel= traces {what}, which needs PyTorch 2.6 or later; this is "
                           f"{torch.__version__}") from None


def parse_parallel(parallel: Any, world_size: Any, model: torch.nn.Module) -> Parallel | None:
    """``parallel=`` (a dict, or the user's fn(model, mesh)) and ``world_size=`` into a ``Parallel``."""
    if parallel is None:
        if world_size is not None:
            raise ValueError(f"world_size={world_size!r} given without parallel=; it sizes the mesh of a parallel plan")
        return None
    if not any(True for _ in model.parameters()):
        raise ValueError(f"parallel= given for {type(model).__name__}, which has no parameters to shard")
    if callable(parallel) and not isinstance(parallel, Mapping):
        _check_available()
        if world_size is None:
            raise ValueError("parallel= is a function of (model, mesh); give world_size= for its mesh")
        return Parallel(plan=parallel, world=_positive_int("world_size", world_size))
    if not isinstance(parallel, Mapping):
        raise TypeError(f"parallel={parallel!r} must be a dict such as {{'fsdp': 8}} or a function (model, mesh) -> "
                        "model")
    unknown = [k for k in parallel if k not in _KEYS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), _KEYS, n=2)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"parallel= has {unknown[0]!r}{hint}; valid: {', '.join(_KEYS)}")
    if "ddp" in parallel and parallel["ddp"] != 1:
        return _parse_ddp(parallel, world_size)
    given = [k for k in DDP_KEYS if k in parallel]
    if given:
        raise ValueError(f"parallel= {given[0]!r} is an option of DDP; give 'ddp': N with it")
    _check_available()
    fsdp = _positive_int("fsdp", parallel.get("fsdp", 1))
    replicate = _positive_int("replicate", parallel.get("replicate", 1))
    tp = _positive_int("tp", parallel.get("tp", 1))
    if fsdp * replicate * tp == 1:
        raise ValueError(f"parallel={dict(parallel)!r} describes one GPU; give 'fsdp' > 1 (or 'replicate', 'tp' > 1)")
    _check_world_size(world_size, parallel, fsdp * replicate * tp)
    if "tp_plan" in parallel and tp == 1:
        raise ValueError("parallel= gives 'tp_plan' without 'tp': N > 1")
    tp_plan, tp_source = _tp_plan(model, parallel.get("tp_plan")) if tp > 1 else ((), "")
    reshard = parallel.get("reshard_after_forward", True)
    if isinstance(reshard, bool):
        pass
    elif isinstance(reshard, int) and 1 <= reshard and fsdp % reshard == 0:
        pass
    else:
        raise ValueError(f"parallel= reshard_after_forward={reshard!r} must be True, False or an int that divides "
                         f"fsdp={fsdp} (the size of the group parameters are resharded to after forward)")
    units = parallel.get("units")
    if units is None:
        from .options import repeated_blocks

        units = repeated_blocks(model)
    else:
        units = _parse_units(model, units)
    return Parallel(fsdp=fsdp, replicate=replicate, reshard_after_forward=reshard,
                    mp_policy=_mp_policy(parallel.get("mp_policy")), units=tuple(units), tp=tp, tp_plan=tp_plan,
                    tp_source=tp_source)


def _check_world_size(world_size: Any, parallel: Mapping, ranks: int) -> None:
    """``world_size=``, when given with a dict, must be the ranks the dict spans."""
    if world_size is not None and _positive_int("world_size", world_size) != ranks:
        raise ValueError(f"world_size={world_size} but parallel={dict(parallel)!r} spans {ranks} ranks")


def _tp_plan(model: torch.nn.Module, given: Any) -> tuple[tuple[tuple[str, Any], ...], str]:
    """The tensor-parallel plan: ``tp_plan=`` (module name patterns to torch ParallelStyles or Hugging Face
    style names), else the plan a Hugging Face model carries; with where it came from."""
    from torch.distributed.tensor.parallel import ParallelStyle

    if given is not None:
        if not isinstance(given, Mapping) or not given:
            raise TypeError(f"parallel= tp_plan={given!r} must be a dict of module name patterns to ParallelStyles "
                            "(ColwiseParallel(), RowwiseParallel(), ...) or style names ('colwise', 'rowwise', ...)")
        plan, source = dict(given), "tp_plan="
    else:
        # a Hugging Face model's: its base model's (in the config) and its own (the head's), by module name
        base = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}
        prefix = getattr(model, "base_model_prefix", "")
        own = prefix if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module) else ""
        plan = {(f"{own}.{k}" if own else k): v for k, v in base.items()}
        plan.update(getattr(model, "_tp_plan", None) or {})
        source = f"{type(model).__name__}'s own tensor-parallel plan (Hugging Face's, as torch ParallelStyles)"
        if not plan:
            raise ValueError(f"parallel={{'tp': ...}}: {type(model).__name__} carries no tensor-parallel plan; give "
                             "tp_plan={'module.pattern': 'colwise' | 'rowwise' | ParallelStyle, ...}")
    names = [n for n, _ in model.named_modules() if n]
    out = []
    for pattern, style in plan.items():
        if not any(_matches(n, pattern) for n in names):
            import difflib

            close = difflib.get_close_matches(pattern, names, n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"parallel= tp_plan names {pattern!r}, which matches no submodule of "
                             f"{type(model).__name__}{hint}")
        if isinstance(style, str):
            style = _hf_style(pattern, style)
        elif not isinstance(style, ParallelStyle):
            raise TypeError(f"parallel= tp_plan[{pattern!r}]={style!r} must be a ParallelStyle or one of "
                            f"{', '.join(HF_STYLES)}")
        out.append((pattern, style))
    return tuple(out), source


def _matches(name: str, pattern: str) -> bool:
    """``name`` matches ``pattern`` atom by atom, as parallelize_module resolves a plan's keys."""
    import fnmatch

    atoms, parts = pattern.split("."), name.split(".")
    return len(atoms) == len(parts) and all(fnmatch.fnmatch(p, a) for p, a in zip(parts, atoms))


def _hf_style(pattern: str, name: str):
    from torch.distributed import tensor as dtensor
    from torch.distributed.tensor import parallel as tp

    if name not in HF_STYLES:
        raise ValueError(f"parallel= tp_plan[{pattern!r}]={name!r}: that style is not translated to torch's "
                         f"ParallelStyles; known: {', '.join(HF_STYLES)}; give a ParallelStyle for it in tp_plan=")
    cls, kwargs = HF_STYLES[name]
    return getattr(tp, cls)(**{k: getattr(dtensor, v)() for k, v in kwargs.items()})


def _parse_ddp(parallel: Mapping, world_size: Any) -> Parallel:
    ddp = _positive_int("ddp", parallel["ddp"])
    mixed = [k for k in _FSDP_KEYS + _TP_KEYS if k in parallel]
    if mixed:
        raise ValueError(f"parallel= gives 'ddp' with {mixed[0]!r}: DDP replicates the whole model on every rank; for "
                         "FSDP groups whose gradients are all-reduced across replicas (HSDP) give {'fsdp': N, "
                         "'replicate': R}, with 'tp' for tensor parallel")
    _check_world_size(world_size, parallel, ddp)
    _check_available("DDP on a fake process group")
    chosen = []
    zero = parallel.get("zero", 0)
    if zero not in (0, 1) or isinstance(zero, bool):
        raise ValueError(f"parallel= zero={zero!r}: 1 is ZeRO stage 1, the optimizer state sharded across the DDP "
                         "ranks (torch's ZeroRedundancyOptimizer); stages 2 and 3 are what FSDP2 does: "
                         "{'fsdp': N, 'reshard_after_forward': False} shards gradients too, and with True the "
                         "parameters as well (DeepSpeed's own engine is not traced)")
    for key in DDP_KEYS:
        if key not in parallel or key == "zero":
            continue
        value = parallel[key]
        if key == "bucket_cap_mb":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"parallel= bucket_cap_mb={value!r} must be a positive number of MiB")
        elif not isinstance(value, bool):
            raise ValueError(f"parallel= {key}={value!r} must be True or False")
        chosen.append((key, value))
    return Parallel(ddp=ddp, ddp_options=tuple(chosen), zero=zero == 1)


def _parse_units(model: torch.nn.Module, units: Any) -> tuple[str, ...]:
    """Module names, or module class names (every module of that class), fully_shard wraps."""
    names = [units] if isinstance(units, str) else units
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"parallel= units={units!r} must be a list of module names or module class names")
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for n in names:
        if n in modules and n:
            chosen.append(n)
            continue
        of_class = [name for name, m in modules.items() if type(m).__name__ == n and name]
        if not of_class:
            raise ValueError(f"parallel= units names {n!r}, which is neither a submodule of {type(model).__name__} nor "
                             "the class of one (valid: dotted names from model.named_modules(), or class names)")
        chosen += of_class
    return tuple(dict.fromkeys(chosen))


# ---- the fake world ----------------------------------------------------------------------------------
_C10D_STATE = ("_pg_map", "_pg_names", "_pg_group_ranks", "_pg_backend_config", "_tags_to_pg", "_pg_to_tag")


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    """A default process group of the fake backend (rank ``rank`` of ``world_size``) while the block runs.
    A process group the user's process already has is kept aside and restored afterwards, names and all."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    saved = None
    if dist.is_initialized():
        world = c10d._world
        saved = {name: dict(getattr(c10d, name)) for name in _C10D_STATE if isinstance(getattr(c10d, name, None), dict)}
        saved["default_pg"] = world.default_pg
        saved["group_count"] = world.group_count
        world.default_pg = None
    try:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if saved is not None:
            world = c10d._world
            for name in _C10D_STATE:
                if name in saved:
                    getattr(c10d, name).update(saved[name])
            world.default_pg = saved["default_pg"]
            world.group_count = saved["group_count"]
            for pg, name in saved.get("_pg_names", {}).items():
                with contextlib.suppress(Exception):
                    c10d._register_process_group(name, pg)


def device_mesh(spec: Parallel):
    """The CPU device mesh the fake copy is parallelized on (built outside fake mode: it holds real ranks)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape, names = spec.mesh_shape
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


# ---- applying the plan ---------------------------------------------------------------------------------
def apply(model: torch.nn.Module, spec: Parallel, mesh, layout: list | None = None) -> torch.nn.Module:
    """Parallelize ``model`` (the fake copy) in place as the user's trainer would: their plan, or tensor
    parallel and then ``fully_shard`` on each unit and on the root. ``layout`` gets each parameter's
    global shape and the dimension tensor parallel shards (``rank_groups``)."""
    if spec.plan is not None:
        def refuse(own):
            def init(*args, **kwargs):
                raise TypeError(f"parallel= {spec.describe()} wraps the model in DistributedDataParallel; a plan is "
                                "traced as sharding (FSDP2, DTensor): give parallel={'ddp': N, ...} for DDP")
            return init

        with _patched(torch.nn.parallel.DistributedDataParallel, "__init__", refuse):
            out = spec.plan(model, mesh)
        out = model if out is None else out
        if not isinstance(out, torch.nn.Module):
            raise TypeError(f"parallel= {spec.describe()} returned {type(out).__name__}, expected the model (or None)")
        _refuse_cpu_offload(out, spec)
        return out
    if spec.tp > 1:
        _tensor_parallel(model, spec, mesh["tp"])
    if layout is not None:
        layout.extend(_layout(p) for p in model.parameters() if p.dim() > 0)
    if spec.fsdp * spec.replicate == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    if spec.tp > 1:
        mesh = mesh[tuple(d for d in mesh.mesh_dim_names if d != "tp")]
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": spec.reshard_after_forward}
    if spec.mp_policy is not None:
        kwargs["mp_policy"] = spec.mp_policy
    modules = dict(model.named_modules())
    try:
        with _RealTensorOps() if spec.tp > 1 else contextlib.nullcontext():  # FSDP2's 2-D mesh over TP's
            for name in sorted(spec.units, key=lambda n: -n.count(".")):  # a unit inside another first
                fully_shard(modules[name], **kwargs)
            fully_shard(model, **kwargs)
    except RuntimeError as exc:
        if "requires CUDA" in str(exc):
            raise RuntimeError(f"this PyTorch ({torch.__version__}) runs FSDP2 on CUDA only; parallel= traces it on a "
                               "CPU device mesh, which needs a later PyTorch") from exc
        raise
    return model


def _refuse_cpu_offload(model: torch.nn.Module, spec: Parallel) -> None:
    """FSDP2's CPUOffloadPolicy keeps the shards in host memory, which the trace (all on the CPU) cannot
    tell from the device's: refused rather than counted on the GPU."""
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        if any(type(getattr(g, "offload_policy", None)).__name__ == "CPUOffloadPolicy" for g in groups):
            raise NotImplementedError(f"parallel= {spec.describe()} shards with FSDP2's CPUOffloadPolicy, which "
                                      "memtrace does not predict yet (the shards would be counted on the GPU)")


# ---- DistributedDataParallel ------------------------------------------------------------------------------
# DDP runs as it is: its C++ reducer allocates the flat gradient buckets at construction (one per dtype until
# the first iteration has shown the order gradients arrive in, then ``bucket_cap_mb`` each, the first 1 MiB),
# copies each gradient into its bucket (or, with ``gradient_as_bucket_view``, makes the gradient a view of
# it), all-reduces the bucket, and copies the result back; it broadcasts the module's buffers before each
# forward. All of it runs on the fake tensors, over the fake process group. Three things cannot, and are
# given what a real run gives them instead:
# - the shape check across ranks at construction reads parameter data: every rank has the same model;
# - the fake group's all-reduce completes with no result, which the reducer needs: a communication hook
#   does what DDP's default does (the bucket divided by the world size, reduced in place, returned);
# - the rebuild of the buckets after the first iteration exchanges the new bucket indices as small integer
#   tensors the reducer fills and reads on the host: those are made real (a few bytes each).


def wrap_ddp(model: torch.nn.Module, spec: Parallel, tracker) -> torch.nn.Module:
    """``DistributedDataParallel(model, **spec.ddp_options)`` on the fake copy, as a trainer constructs it."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel
    from torch.nn.parallel import distributed as ddp_module

    options = dict(spec.ddp_options)
    with _patched(ddp_module, "_verify_param_shape_across_processes", lambda own: lambda *args, **kwargs: None), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
        ddp = DistributedDataParallel(model, **options)
    role = Category.GRADIENT if options.get("gradient_as_bucket_view") else Category.COMMUNICATION
    world = spec.world_size

    def allreduce(state, bucket):  # DDP's default reduction: in place, averaged over the ranks
        buffer = bucket.buffer()
        tracker.mark_role(buffer, role)
        buffer.div_(world)
        done = torch.futures.Future()
        done.set_result(buffer)
        return done

    ddp.register_comm_hook(None, allreduce)
    ddp.reducer = _Reducer(ddp.reducer)
    return ddp


def zero_redundancy(options, params: list[torch.Tensor], prepare) -> torch.optim.Optimizer:
    """torch's ZeroRedundancyOptimizer around the optimizer: each rank steps the parameters assigned to it
    (greedily, largest first, to the rank holding the fewest elements) and broadcasts them to the others."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(options.optimizer, type):
        raise ValueError("parallel= zero=1 wraps an optimizer class in ZeroRedundancyOptimizer; give optimizer= a "
                         f"class or a name, not {options.optimizer!r}")
    optimizer = ZeroRedundancyOptimizer(params, optimizer_class=options.optimizer, **options.optimizer_kwargs)
    prepare(optimizer.optim)
    return optimizer


def zero_rank_keys(optimizer) -> tuple:
    """For each rank, the shapes and dtypes of the parameters ZeroRedundancyOptimizer assigns it: ranks
    with the same hold the same memory."""
    return tuple(tuple((tuple(p.shape), p.dtype) for group in per_rank for p in group["params"])
                 for per_rank in optimizer._partition_parameters())


class _Reducer:
    """DDP's reducer, whose bucket rebuild runs with its index exchange on real host tensors."""

    def __init__(self, reducer):
        object.__setattr__(self, "_reducer", reducer)

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def __setattr__(self, name, value):
        setattr(self._reducer, name, value)

    def _rebuild_buckets(self) -> bool:
        with _RealTensorOps(integer_factories=True):
            return self._reducer._rebuild_buckets()


class _RealTensorOps(TorchDispatchMode):
    """Ops on real tensors only run for real (a device mesh's rank tensor, whose coordinates FSDP2 computes
    for a 2-D mesh), and with ``integer_factories`` integer tensors made from nothing too (the reducer
    writes and reads the bucket indices it exchanges through their data). Everything else goes on to the
    fake mode and the tracker."""

    def __init__(self, integer_factories: bool = False):
        super().__init__()
        self.integer_factories = integer_factories

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._python_dispatch import _disable_current_modes
        from torch.utils._pytree import tree_flatten

        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        real = (not any(isinstance(t, FakeTensor) for t in tensors) if tensors
                else self.integer_factories and kwargs.get("dtype") in (torch.int32, torch.int64))
        if real:
            with _disable_current_modes():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _tensor_parallel(model: torch.nn.Module, spec: Parallel, mesh) -> None:
    """``parallelize_module`` with the plan; every dimension it shards must divide by the TP degree: the
    styles take each rank's activations for an even shard of a global tensor (``DTensor.from_local``
    infers the global size as TP x the local one), so a real run of an uneven plan fails or computes the
    wrong shapes."""
    import warnings

    from torch.distributed.tensor.parallel import parallelize_module

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*could not be resolved.*")
        parallelize_module(model, mesh, dict(spec.tp_plan))
    for name, p in model.named_parameters():
        shape, dim = _layout(p)
        if dim is not None and shape[dim] % spec.tp:
            raise ValueError(f"tp={spec.tp} does not divide dim {dim} of {name} ({list(shape)}): tensor parallel "
                             "takes each rank's activations for an even shard, so the real step would fail or "
                             "compute wrong shapes; give a tp that divides it (pad the vocabulary), or a tp_plan "
                             "that leaves that module whole")


def _layout(p: torch.Tensor) -> tuple[tuple[int, ...], int | None]:
    """A parameter's global shape and the dimension tensor parallel shards (None: whole on every TP rank)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard

    if isinstance(p, DTensor):
        dims = [pl.dim for pl in p.placements if isinstance(pl, Shard)]
        return tuple(p.shape), (dims[0] if dims else None)
    return tuple(p.shape), None


# optimizers whose every op is elementwise over a parameter and its own state
ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")


def local_shards(params: dict[str, torch.Tensor], options) -> dict[str, torch.nn.Parameter] | None:
    """For an elementwise optimizer over parameters sharded on dim 0 only (FSDP2's), a parameter per local
    shard, for the optimizer to step (the engine points each at its shard when the optimizer runs); else
    None.

    DTensor runs such an optimizer's ops on each local shard, so the ops and allocations are the same, but
    it derives the sharding of every foreach op over all the parameters first, and the derivation is not
    reused from one step to the next (the scalars differ): most of a sharded trace's time. Stepping the
    shards themselves skips it. Optimizers with reductions (Adafactor's factored moments, LAMB's norms)
    need DTensor's collectives and keep the DTensor parameters."""
    if options.optimizer_name not in ELEMENTWISE_OPTIMIZERS or options.optimizer is None:
        return None
    if not isinstance(options.optimizer, type) or options.optimizer.__module__.split(".")[:2] != ["torch", "optim"]:
        return None
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard

    out = {}
    for name, p in params.items():
        if not isinstance(p, DTensor) or not all(isinstance(pl, Shard) and pl.dim == 0 for pl in p.placements):
            return None
        # empty until the optimizer phase gives it the shard FSDP holds then (FSDP re-pads uneven shards at
        # its lazy initialisation, freeing the first ones: a reference here would keep them)
        out[name] = torch.nn.Parameter(p._local_tensor.new_empty(0), requires_grad=p.requires_grad)
    return out


def clear_sharded_grads_with(optimizer, sharded: list[torch.Tensor]) -> None:
    """``optimizer.zero_grad()`` clears the sharded parameters' gradients too, as it would stepping them."""
    own = optimizer.zero_grad

    def zero_grad(set_to_none: bool = True):
        own(set_to_none)
        if set_to_none:
            for p in sharded:
                p.grad = None

    optimizer.zero_grad = zero_grad


def wrapper_types() -> tuple[type, ...]:
    from torch.distributed.tensor import DTensor

    return (DTensor,)


# ---- what FSDP2's buffers are --------------------------------------------------------------------------
def op_rules() -> dict:
    """Dispatch rules that name the buffers of FSDP2 and DDP: the all-gather input and output are
    communication buffers; the reduce-scatter input is one, and the unsharded gradients copied into it are
    gradients; so are the flat tensors DDP broadcasts parameters and buffers in."""
    rules = {}
    ops = getattr(torch.ops, "fsdp", None)

    def communication(tracker, func, args, kwargs):
        out = func(*args, **kwargs)
        tracker.record_outputs(out, func)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                tracker.mark_role(t, Category.COMMUNICATION)
        return out

    def reduce_scatter_input(tracker, func, args, kwargs):
        grads = args[0] if args else kwargs.get("tensors", ())
        for g in grads:
            if isinstance(g, torch.Tensor):
                tracker.mark_role(g, Category.GRADIENT)
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor):  # allocated before, by torch.empty
            tracker.mark_role(out, Category.COMMUNICATION)
        return communication(tracker, func, args, kwargs)

    def broadcast(tracker, func, args, kwargs):  # DDP's flattened parameters and buffers
        for t in (args[0] if args else kwargs.get("tensors", ())):
            if isinstance(t, torch.Tensor):
                tracker.mark_role(t, Category.COMMUNICATION)
        return func(*args, **kwargs)

    def wrap_for_autograd(tracker, func, args, kwargs):
        # a functional collective's result wrapped for autograd: in a real run the same storage, not a view
        # (AsyncCollectiveTensor(input)); its fake implementation allocates a new tensor (empty_like).
        # Under the dispatch modes autograd is already handled: detach shares the storage, as no view does
        return torch.ops.aten.detach.default(args[0] if args else kwargs["input"])

    for packet, rule in ((getattr(ops, "all_gather_copy_in", None), communication),
                         (getattr(ops, "chunk_cat", None), reduce_scatter_input),
                         (getattr(torch.ops.c10d, "broadcast_", None), broadcast),
                         (getattr(torch.ops._c10d_functional, "_wrap_tensor_autograd", None), wrap_for_autograd)):
        if packet is not None:
            for overload in packet.overloads():
                rules[getattr(packet, overload)] = rule
    return rules


@contextlib.contextmanager
def _patched(owner, name: str, make):
    own = owner.__dict__.get(name)
    setattr(owner, name, make(getattr(owner, name)))
    try:
        yield
    finally:
        if own is None:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


@contextlib.contextmanager
def traced(tracker):
    """What the tracker must be told, or must not see, while a parallelized step runs.

    - FSDP2 gives each unsharded parameter its memory by resizing its storage (``alloc_storage``) and takes
      it back by resizing it to zero (``free_storage``); neither is an op. The tracker is told of both: such
      a storage holds gathered parameters, a communication buffer.
    - DTensor derives each op's output shape by running the op on fake tensors of the global shape
      (``ShardingPropagator._propagate_tensor_meta_non_cached``), under the fake mode it finds, which is the
      trace's: those ops are not the rank's and are hidden from the tracker.
    - DTensor must take its eager paths, as in the real step (``_eager_collectives``)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    def resize_wrapper(original):
        def resize_(storage, size):
            before = storage.nbytes()
            result = original(storage, size)
            tracker.storage_resized(storage, before, storage.nbytes(), Category.COMMUNICATION)
            return result
        return resize_

    def hidden(original):
        def propagate(self, *args, **kwargs):
            with tracker.hidden():
                return original(self, *args, **kwargs)
        return propagate

    with _patched(torch.UntypedStorage, "resize_", resize_wrapper), \
            _patched(ShardingPropagator, "_propagate_tensor_meta_non_cached", hidden), _eager_collectives():
        yield


@contextlib.contextmanager
def _eager_collectives():
    """DTensor and the functional collectives take their compile-time paths whenever a fake mode is on
    (``_are_we_tracing``): different padding, waits and uncached sharding propagation. The step traced is
    an eager one, so they are told it is not being compiled, in every module that imported the check."""
    import sys

    from torch.distributed import _functional_collectives as fc

    original = fc._are_we_tracing

    def not_tracing() -> bool:
        return False

    owners = [m for name, m in list(sys.modules.items())
              if name.startswith("torch.distributed") and getattr(m, "_are_we_tracing", None) is original]
    for m in owners:
        m._are_we_tracing = not_tracing
    try:
        yield
    finally:
        for m in owners:
            m._are_we_tracing = original


# ---- which ranks differ --------------------------------------------------------------------------------
def rank_groups(layout: tuple, spec: Parallel, keys: tuple = ()) -> list[list[int]]:
    """The ranks, grouped by the local sizes of every sharded parameter (ranks with the same sizes hold the
    same memory), each group's first rank first; rank 0's group first. ``layout``: each parameter's global
    shape and the dimension tensor parallel shards (``apply``); DTensor and FSDP2 both split a dimension as
    ``torch.chunk`` does, tensor parallel first, then FSDP2 dim 0 of the TP shard. ``keys``: what each rank
    holds, where it is known per rank (``zero_rank_keys``)."""
    if not keys:
        if spec.plan is not None or not spec.shards:  # a plan's own sharding is not known; DDP replicates
            return [list(range(spec.world_size))]
        keys = tuple(_local_sizes(layout, spec, rank) for rank in range(spec.world_size))
    by_key: dict[Any, list[int]] = {}
    for rank, key in enumerate(keys):
        by_key.setdefault(key, []).append(rank)
    return sorted(by_key.values(), key=lambda g: g[0])


def _local_sizes(layout: tuple, spec: Parallel, rank: int) -> tuple:
    """The local shape of every parameter on ``rank`` (the mesh is replicate x fsdp x tp, row-major)."""
    tp_index, fsdp_index = rank % spec.tp, (rank // spec.tp) % spec.fsdp
    out = []
    for shape, tp_dim in layout:
        local = list(shape)
        if tp_dim is not None:
            local[tp_dim] = _chunk_rows(local[tp_dim], spec.tp, tp_index)
        local[0] = _chunk_rows(local[0], spec.fsdp, fsdp_index)
        out.append(tuple(local))
    return tuple(out)


def _chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of ``torch.chunk(rows, parts)[index]`` (empty when the chunks run out), as FSDP2 shards dim 0."""
    size = math.ceil(rows / parts)
    return max(0, min(size, rows - index * size))


def describe_ranks(groups) -> str:
    def runs(ranks):
        out, start = [], ranks[0]
        for a, b in zip(ranks, [*ranks[1:], None]):
            if b != a + 1:
                out.append(f"{start}" if start == a else f"{start}-{a}")
                if b is not None:
                    start = b
        return ", ".join(out)
    return "; ".join(runs(g) for g in groups)
