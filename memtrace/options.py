"""The user's arguments, checked once and turned into one frozen ``Options`` value.

Every error names the argument, the value given and the valid choices, in one line.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .gpus import DEFAULT_GPU, GPU, lookup


class Category(str, enum.Enum):
    """What a byte of memory is for, at the moment it is live."""

    PARAMETER = "parameters"
    BUFFER = "buffers"
    GRADIENT = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATION = "activations"
    TEMPORARY = "temporaries"
    INPUT = "inputs"
    WORKSPACE = "workspaces"
    COMMUNICATION = "communication"  # FSDP's all-gather and reduce-scatter buffers, the unsharded parameters


class Phase(str, enum.Enum):
    SETUP = "setup"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}

# bitsandbytes' optimizers, imported when named: block-wise 8-bit states, and paged ones whose large states live
# in CUDA unified memory
BITSANDBYTES_OPTIMIZERS: dict[str, str] = {
    "adamw8bit": "AdamW8bit",
    "adam8bit": "Adam8bit",
    "paged_adamw8bit": "PagedAdamW8bit",
    "paged_adamw": "PagedAdamW32bit",
    "paged_adamw32bit": "PagedAdamW32bit",
    "lion8bit": "Lion8bit",
    "paged_lion8bit": "PagedLion8bit",
}

AMP_MODES: dict[Any, torch.dtype | None] = {
    False: None, None: None, "none": None, "off": None,
    True: torch.float16, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}

DEVICES = ("cuda", "cpu")

@dataclass(frozen=True)
class TensorSpec:
    """One input tensor, described without its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str | int  # keyword name or position of a top-level argument; a path ("1[0].boxes") inside one
    # the user's tensor when it holds data: measuring the real step feeds its values (a detector's boxes
    # must be valid boxes); a prediction reads only the shape and dtype
    value: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype, device="meta").element_size()


# Plain Python values an input may hold beside its tensors, passed to the model as given.
PLAIN_VALUES = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


@dataclass(frozen=True)
class Inputs:
    """The model's inputs as a structure: positional and keyword arguments, each a tensor, a plain Python
    value, or a list, tuple or dict of them, nested; every tensor is a ``TensorSpec``. ``form`` is how the
    user gave them ("tensor", "tuple" or "dict"), which is the form ``loss_fn`` receives them in."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    form: str = "tuple"

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        """Every input tensor, in argument order."""
        out: list[TensorSpec] = []
        _collect(self.args, out)
        _collect(tuple(self.kwargs.values()), out)
        return tuple(out)

    def build(self, factory: Callable[[TensorSpec], torch.Tensor]) -> tuple[list, dict, Any]:
        """(args, kwargs, batch) for the model call, each tensor made by ``factory``; ``batch`` is what
        ``loss_fn`` receives: the tensor, tuple or dict in the form the user gave it."""
        args = [_build(a, factory) for a in self.args]
        kwargs = {k: _build(v, factory) for k, v in self.kwargs.items()}
        batch = kwargs if self.form == "dict" else args[0] if self.form == "tensor" else tuple(args)
        return args, kwargs, batch


def _collect(node: Any, out: list) -> None:
    if isinstance(node, TensorSpec):
        out.append(node)
    elif isinstance(node, Mapping):
        for v in node.values():
            _collect(v, out)
    elif isinstance(node, (tuple, list)):
        for v in node:
            _collect(v, out)


def _build(node: Any, factory: Callable[[TensorSpec], torch.Tensor]) -> Any:
    if isinstance(node, TensorSpec):
        return factory(node)
    if isinstance(node, Mapping):
        return {k: _build(v, factory) for k, v in node.items()}
    if isinstance(node, list):
        return [_build(v, factory) for v in node]
    if isinstance(node, tuple):
        items = [_build(v, factory) for v in node]
        return type(node)(*items) if hasattr(node, "_fields") else tuple(items)  # a namedtuple keeps its type
    return node


@dataclass(frozen=True)
class Options:
    inputs: Inputs
    optimizer: Callable[[Any], torch.optim.Optimizer] | None
    optimizer_name: str
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    amp_dtype: torch.dtype | None = None
    dtype: torch.dtype | None = None  # the dtype floating-point parameters and buffers are converted to; None: as held
    param_dtypes: str = "float32"  # the floating-point dtypes of the parameters in the step, as the report shows them
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    device: str = "cuda"
    steps: int = 2
    accumulation_steps: int = 1  # micro-batches whose gradients each optimizer step sums
    train: bool = True
    gpu: GPU | None = None  # the card a CUDA run is predicted for
    checkpoint: tuple[str, ...] = ()  # modules whose forward runs under torch.utils.checkpoint
    alloc_conf: str | None = None  # the CUDA allocator settings (PYTORCH_CUDA_ALLOC_CONF syntax); None: the environment's
    data_dependent: Any = None  # how sizes and values that depend on tensor data are chosen (datadep.SizePolicy)
    parallel: Any = None  # parallel.Parallel: how the model is sharded across ranks; None: one GPU
    compile: Any = None  # the forward through torch.compile (compiled.backend): a dict of its settings; None: eager
    # the model's output stays referenced through backward (``out = model(x); loss_fn(out).backward()``);
    # False: the output dropped once the loss is computed, as the Hugging Face Trainer's training_step drops it
    keep_output: bool = True

    @property
    def amp_name(self) -> str:
        return {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype]

    @property
    def uses_grad_scaler(self) -> bool:
        return self.amp_dtype is torch.float16


@dataclass(frozen=True)
class HeldDtypes:
    """The floating-point dtypes of a model's parameters as the step will hold them."""

    by_bytes: tuple[tuple[torch.dtype, int], ...]  # (dtype, parameter bytes), most bytes first
    trainable: frozenset  # the dtypes of parameters that require grad
    input: torch.dtype  # the dtype of an ``input_shape=`` input: the first floating-point parameter's

    def describe(self) -> str:
        names = [str(d).removeprefix("torch.") for d, _ in self.by_bytes]
        return "+".join(names) if names else "float32"


def model_dtypes(model: torch.nn.Module, convert_to: torch.dtype | None) -> HeldDtypes:
    """A model's floating-point parameter dtypes, each tensor's own, or ``convert_to`` for all of them (as
    ``model.to(convert_to)`` converts them)."""
    sizes: dict[torch.dtype, int] = {}
    trainable = set()
    first = None
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        dt = convert_to or p.dtype
        first = first or dt
        sizes[dt] = sizes.get(dt, 0) + p.numel() * torch.empty((), dtype=dt, device="meta").element_size()
        if p.requires_grad:
            trainable.add(dt)
    if first is None:
        first = convert_to or next((b.dtype for b in model.buffers() if b.is_floating_point()), torch.float32)
    return HeldDtypes(tuple(sorted(sizes.items(), key=lambda kv: -kv[1])), frozenset(trainable), first)


def _choices(keys) -> str:
    return ", ".join(repr(k) for k in keys if isinstance(k, str))


def _parse_dtype(name: str, value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[value.lower().removeprefix("torch.")]
    raise ValueError(f"{name}={value!r} is not a dtype; valid: torch.dtype or {_choices(DTYPES)}")


def _parse_shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"input_shape={value!r} must be a sequence of ints, e.g. (64, 3, 224, 224)")
    try:
        shape = tuple(int(s) for s in value)
    except (TypeError, ValueError):
        raise TypeError(f"input_shape={value!r} must be a sequence of ints, e.g. (64, 3, 224, 224)") from None
    if not shape or any(s < 0 for s in shape) or any(s != v for s, v in zip(shape, value)):
        raise ValueError(f"input_shape={value!r} must be a non-empty sequence of non-negative ints")
    return shape


def _spec(t: torch.Tensor, key: str | int) -> TensorSpec:
    real = t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor)
    return TensorSpec(tuple(t.shape), t.dtype, key, t if real else None)


def _input_tree(node: Any, key: str | int, path: str) -> Any:
    """One argument with its tensors replaced by ``TensorSpec``; ``path`` names the place in errors and in
    the report ("1[0].boxes")."""
    if isinstance(node, torch.Tensor):
        return _spec(node, key if path == str(key) else path)
    if isinstance(node, Mapping):
        if not all(isinstance(k, str) for k in node):
            raise TypeError(f"inputs= has a dict at {path} with keys that are not strings: {list(node)[:4]!r}")
        return {k: _input_tree(v, key, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_input_tree(v, key, f"{path}[{i}]") for i, v in enumerate(node)]
        return items if isinstance(node, list) else type(node)(*items) if hasattr(node, "_fields") else tuple(items)
    if isinstance(node, PLAIN_VALUES):
        return node
    raise TypeError(f"inputs= holds a {type(node).__name__} at {path}; valid: tensors (meta tensors allowed), plain "
                    "Python values (numbers, strings, None), and lists, tuples and dicts of them")


def parse_inputs(input_shape: Any, inputs: Any, float_dtype: torch.dtype = torch.float32) -> Inputs:
    """``input_shape=`` (one float tensor) or ``inputs=``: a tensor (the one positional argument), a tuple or
    list (the positional arguments) or a dict (keyword arguments), each argument a tensor, a plain value,
    or a nested list, tuple or dict of them (a detector's list of images and list of target dicts)."""
    if (input_shape is None) == (inputs is None):
        given = "both" if input_shape is not None else "neither"
        raise ValueError(f"give exactly one of input_shape= and inputs= ({given} given)")
    if input_shape is not None:  # the input is in the parameters' dtype, as pure half/bf16 training feeds it
        return Inputs((TensorSpec(_parse_shape(input_shape), float_dtype, 0),), {}, "tensor")
    if isinstance(inputs, torch.Tensor):
        return Inputs((_spec(inputs, 0),), {}, "tensor")
    if isinstance(inputs, Mapping):
        if not inputs:
            raise ValueError("inputs={} is empty; give at least one tensor")
        if not all(isinstance(k, str) and k.isidentifier() for k in inputs):
            raise TypeError(f"inputs= is a dict of keyword arguments; its keys must be names, got {list(inputs)!r}")
        parsed = Inputs((), {k: _input_tree(t, k, k) for k, t in inputs.items()}, "dict")
    elif isinstance(inputs, (tuple, list)):
        if not inputs:
            raise ValueError("inputs=() is empty; give at least one tensor")
        parsed = Inputs(tuple(_input_tree(t, i, str(i)) for i, t in enumerate(inputs)), {}, "tuple")
    else:
        raise TypeError(f"inputs= is a {type(inputs).__name__}; valid: a tensor, a tuple of positional arguments "
                        "or a dict of keyword arguments (each a tensor, a plain value, or lists, tuples and "
                        "dicts of them)")
    if not parsed.specs:
        raise ValueError("inputs= holds no tensor; give at least one")
    return parsed


def parse_optimizer(optimizer: Any) -> tuple[Callable | None, str]:
    if optimizer is None:
        return None, "none"
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key in BITSANDBYTES_OPTIMIZERS:
            try:
                import bitsandbytes.optim
            except ImportError as exc:
                raise ValueError(f"optimizer={optimizer!r} is bitsandbytes' {BITSANDBYTES_OPTIMIZERS[key]}, and "
                                 f"bitsandbytes does not import here ({exc}); pip install bitsandbytes") from exc
            cls = getattr(bitsandbytes.optim, BITSANDBYTES_OPTIMIZERS[key])
            return cls, cls.__name__
        if key not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is unknown; valid: {_choices(OPTIMIZERS)}, "
                             f"{_choices(BITSANDBYTES_OPTIMIZERS)} (bitsandbytes), None, "
                             "a torch.optim.Optimizer subclass or a callable(params) -> Optimizer")
        return OPTIMIZERS[key], OPTIMIZERS[key].__name__
    if inspect.isclass(optimizer) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, optimizer.__name__
    if callable(optimizer) and not inspect.isclass(optimizer):
        return optimizer, getattr(optimizer, "__name__", type(optimizer).__name__)
    raise TypeError(f"optimizer={optimizer!r} is not an optimizer; valid: {_choices(OPTIMIZERS)}, None, "
                    "a torch.optim.Optimizer subclass or a callable(params) -> Optimizer")


def parse_options(
    model: Any,
    *,
    input_shape: Any = None,
    inputs: Any = None,
    optimizer: Any = "adam",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    amp: Any = False,
    dtype: Any = None,
    loss_fn: Any = None,
    device: Any = "cuda",
    steps: Any = 2,
    accumulation_steps: Any = 1,
    train: Any = True,
    gpu: Any = None,
    checkpoint: Any = None,
    alloc_conf: Any = None,
    data_dependent: Any = None,
    parallel: Any = None,
    world_size: Any = None,
    compile: Any = None,
    keep_output: Any = True,
) -> Options:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model is a {type(model).__name__}, expected a torch.nn.Module")
    opt_factory, opt_name = parse_optimizer(optimizer)
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
        raise TypeError(f"optimizer_kwargs={optimizer_kwargs!r} must be a dict of keyword arguments")
    if optimizer_kwargs and opt_factory is None:
        raise ValueError(f"optimizer_kwargs={dict(optimizer_kwargs)!r} given with optimizer=None")
    key = amp.lower() if isinstance(amp, str) else amp
    if isinstance(key, (bool, str, type(None))) and key in AMP_MODES:
        amp_dtype = AMP_MODES[key]
    else:
        raise ValueError(f"amp={amp!r} is unknown; valid: False, True, 'fp16', 'bf16'")
    param_dtype = None if dtype is None else _parse_dtype("dtype", dtype)
    if param_dtype is not None and not param_dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating-point dtype; valid: {_choices(DTYPES)}")
    if amp_dtype is not None and param_dtype not in (None, torch.float32):
        raise ValueError(f"amp={amp!r} needs float32 parameters, got dtype={param_dtype}; "
                         "use amp=False for pure half/bf16 training")
    held = model_dtypes(model, param_dtype)
    if amp_dtype is torch.float16 and train and torch.float16 in held.trainable:
        # GradScaler.unscale_ raises "Attempting to unscale FP16 gradients."
        raise ValueError("amp='fp16' scales the loss with GradScaler, which cannot unscale float16 gradients, and "
                         "this model has float16 parameters that require grad; give dtype=torch.float32 (fp16 AMP "
                         "trains float32 parameters) or amp=False (pure float16 training)")
    specs = parse_inputs(input_shape, inputs, held.input)
    dev = str(device.type if isinstance(device, torch.device) else device).lower()
    dev = dev.split(":", 1)[0] if dev.split(":", 1)[-1].isdigit() else dev  # "cuda:1" predicts a CUDA run too
    if dev not in DEVICES:
        raise ValueError(f"device={device!r} is unknown; valid: {_choices(DEVICES)}")
    if alloc_conf is not None and not isinstance(alloc_conf, str):
        raise TypeError(f"alloc_conf={alloc_conf!r} must be a string like 'expandable_segments:True'")
    if alloc_conf is not None and dev != "cuda":
        raise ValueError(f"alloc_conf={alloc_conf!r} given with device={device!r}; it sets the CUDA caching allocator")
    if gpu is not None and dev != "cuda":
        raise ValueError(f"gpu={gpu!r} given with device={device!r}; gpu= names the card of a device='cuda' run")
    card = lookup(gpu if gpu is not None else DEFAULT_GPU) if dev == "cuda" else None
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} is not callable; expected callable(output, inputs) -> scalar tensor")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps={accumulation_steps!r} must be an int >= 1")
    if not isinstance(train, bool):
        raise TypeError(f"train={train!r} must be True or False")
    if not isinstance(keep_output, bool):
        raise TypeError(f"keep_output={keep_output!r} must be True or False")
    if not train and accumulation_steps != 1:
        raise ValueError(f"accumulation_steps={accumulation_steps!r} given with train=False; it counts the "
                         "micro-batches of a training step")
    if not train:
        opt_factory, opt_name, optimizer_kwargs = None, "none", None
    checkpointed = parse_checkpoint(model, checkpoint) if train else ()
    from .datadep import SizePolicy

    SizePolicy(data_dependent)  # checked here, so that a bad policy fails before anything is traced
    if (parallel is not None or compile not in (None, False)):
        from .quantized import uses_bitsandbytes

        if uses_bitsandbytes(model):
            raise ValueError(f"{'parallel=' if parallel is not None else 'compile='} with bitsandbytes 4-bit weights "
                             "is not predicted yet (FSDP-QLoRA's float quant_storage, Dynamo over bitsandbytes' "
                             "ops); the single-GPU eager step is")
    from .parallel import parse_parallel

    spec = parse_parallel(parallel, world_size, model)
    if spec is not None and not train:
        raise ValueError("parallel= predicts a training step; give train=True")
    compiled = parse_compile(compile)
    if compiled is not None and spec is not None:
        raise ValueError("compile= with parallel= is not predicted yet: a compiled sharded step (FSDP2's hooks "
                         "inside Dynamo's graphs) is traced by neither; give one of them")
    if compiled is not None and checkpointed:
        raise ValueError("compile= with checkpoint= is not predicted yet (checkpointed regions inside compiled "
                         "graphs are AOTAutograd's to partition); give one of them")
    return Options(
        inputs=specs,
        optimizer=opt_factory,
        optimizer_name=opt_name,
        optimizer_kwargs=dict(optimizer_kwargs or {}),
        amp_dtype=amp_dtype,
        dtype=param_dtype,
        param_dtypes=held.describe(),
        loss_fn=loss_fn,
        device=dev,
        steps=steps,
        accumulation_steps=accumulation_steps,
        train=train,
        gpu=card,
        checkpoint=checkpointed,
        alloc_conf=alloc_conf,
        data_dependent=data_dependent,
        parallel=spec,
        compile=compiled,
        keep_output=keep_output,
    )


COMPILE_KEYS = ("mode", "activation_memory_budget")


def parse_compile(compile: Any) -> dict[str, Any] | None:
    """``None``/``False``: the eager step; ``True``: ``torch.compile`` with Inductor; a dict: with
    ``activation_memory_budget`` (0 to 1, AOTAutograd's partitioner: the share of activation memory kept
    for backward) and ``mode`` ("default" only: "reduce-overhead" runs CUDA graphs from a private memory pool,
    "max-autotune" picks kernels by timing them on the GPU, neither of which a trace without one can follow)."""
    if compile is None or compile is False:
        return None
    from .targets import TORCH_VERSION

    if TORCH_VERSION < (2, 6):
        raise ValueError(f"compile= needs PyTorch 2.6 or later (this is {torch.__version__}, whose Dynamo cannot "
                         "compile on the fake tensors of the trace); compile=False predicts the eager step")
    if compile is True:
        return {}
    if not isinstance(compile, Mapping):
        raise TypeError(f"compile={compile!r} must be True, False or a dict with {', '.join(COMPILE_KEYS)}")
    unknown = [k for k in compile if k not in COMPILE_KEYS]
    if unknown:
        raise ValueError(f"compile= has unknown key {unknown[0]!r}; valid: {', '.join(COMPILE_KEYS)}")
    mode = compile.get("mode")
    if mode not in (None, "default"):
        raise ValueError(f"compile mode {mode!r} is not predicted: only 'default' ('reduce-overhead' replays CUDA "
                         "graphs from a private memory pool, 'max-autotune' chooses kernels by timing them on a GPU)")
    budget = compile.get("activation_memory_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1):
        raise ValueError(f"activation_memory_budget={budget!r} must be a number from 0 to 1")
    return {k: v for k, v in compile.items() if v is not None}


def repeated_blocks(model: torch.nn.Module) -> tuple[str, ...]:
    """The model's repeated blocks: the children of every outermost ``nn.ModuleList`` or ``nn.Sequential``
    holding two or more modules of one type that have parameters (a transformer's layers, a ResNet
    stage's bottlenecks)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        if any(name == f or name.startswith(f + ".") for f in found):
            continue
        children = list(module.named_children())
        if (len(children) >= 2 and len({type(c) for _, c in children}) == 1
                and all(any(True for _ in c.parameters()) for _, c in children)):
            found += [f"{name}.{child}" if name else child for child, _ in children]
    return tuple(found)


def parse_checkpoint(model: torch.nn.Module, checkpoint: Any) -> tuple[str, ...]:
    """``None``/``False``: no checkpointing; ``"auto"``/``True``: the repeated blocks; a list of module names."""
    if checkpoint is None or checkpoint is False:
        return ()
    if checkpoint is True or (isinstance(checkpoint, str) and checkpoint.lower() == "auto"):
        blocks = repeated_blocks(model)
        if not blocks:
            raise ValueError(f"checkpoint={checkpoint!r}: {type(model).__name__} has no repeated blocks (an "
                             "nn.ModuleList or nn.Sequential of same-typed modules); name the modules instead")
        return blocks
    names = [checkpoint] if isinstance(checkpoint, str) else checkpoint
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"checkpoint={checkpoint!r} must be None, 'auto' or a list of module names")
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules or not n:
            raise ValueError(f"checkpoint= names {n!r}, which is not a submodule of {type(model).__name__} "
                             "(valid: dotted names from model.named_modules())")
    nested = [n for n in names if any(n.startswith(o + ".") for o in names)]
    if nested:
        raise ValueError(f"checkpoint= names {nested[0]!r} inside another checkpointed module; name one of them")
    return tuple(names)
