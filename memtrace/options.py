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
    key: str | int  # keyword name, or position in the positional arguments

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype, device="meta").element_size()


@dataclass(frozen=True)
class Options:
    inputs: tuple[TensorSpec, ...]
    optimizer: Callable[[Any], torch.optim.Optimizer] | None
    optimizer_name: str
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    amp_dtype: torch.dtype | None = None
    dtype: torch.dtype = torch.float32
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    device: str = "cuda"
    steps: int = 2
    accumulation_steps: int = 1  # micro-batches whose gradients each optimizer step sums
    train: bool = True
    gpu: GPU | None = None  # the card a CUDA run is predicted for
    checkpoint: tuple[str, ...] = ()  # modules whose forward runs under torch.utils.checkpoint
    alloc_conf: str | None = None  # the CUDA allocator settings (PYTORCH_CUDA_ALLOC_CONF syntax); None: the environment's

    @property
    def amp_name(self) -> str:
        return {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype]

    @property
    def uses_grad_scaler(self) -> bool:
        return self.amp_dtype is torch.float16


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


def _spec(t: Any, key: str | int) -> TensorSpec:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"inputs[{key!r}] is a {type(t).__name__}, expected a torch.Tensor (meta tensors allowed)")
    return TensorSpec(tuple(t.shape), t.dtype, key)


def parse_inputs(input_shape: Any, inputs: Any, float_dtype: torch.dtype = torch.float32) -> tuple[TensorSpec, ...]:
    if (input_shape is None) == (inputs is None):
        given = "both" if input_shape is not None else "neither"
        raise ValueError(f"give exactly one of input_shape= and inputs= ({given} given)")
    if input_shape is not None:  # the input is in the parameters' dtype, as pure half/bf16 training feeds it
        return (TensorSpec(_parse_shape(input_shape), float_dtype, 0),)
    if isinstance(inputs, torch.Tensor):
        return (_spec(inputs, 0),)
    if isinstance(inputs, Mapping):
        if not inputs:
            raise ValueError("inputs={} is empty; give at least one tensor")
        return tuple(_spec(t, str(k)) for k, t in inputs.items())
    if isinstance(inputs, (tuple, list)):
        if not inputs:
            raise ValueError("inputs=() is empty; give at least one tensor")
        return tuple(_spec(t, i) for i, t in enumerate(inputs))
    raise TypeError(
        f"inputs= is a {type(inputs).__name__}; valid: a tensor, a tuple of tensors, or a dict of keyword tensors"
    )


def parse_optimizer(optimizer: Any) -> tuple[Callable | None, str]:
    if optimizer is None:
        return None, "none"
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is unknown; valid: {_choices(OPTIMIZERS)}, None, "
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
    dtype: Any = torch.float32,
    loss_fn: Any = None,
    device: Any = "cuda",
    steps: Any = 2,
    accumulation_steps: Any = 1,
    train: Any = True,
    gpu: Any = None,
    checkpoint: Any = None,
    alloc_conf: Any = None,
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
    param_dtype = _parse_dtype("dtype", dtype)
    if not param_dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating-point dtype; valid: {_choices(DTYPES)}")
    if amp_dtype is not None and param_dtype != torch.float32:
        raise ValueError(f"amp={amp!r} needs float32 parameters, got dtype={param_dtype}; "
                         "use amp=False for pure half/bf16 training")
    specs = parse_inputs(input_shape, inputs, param_dtype)
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
    if not train and accumulation_steps != 1:
        raise ValueError(f"accumulation_steps={accumulation_steps!r} given with train=False; it counts the "
                         "micro-batches of a training step")
    if not train:
        opt_factory, opt_name, optimizer_kwargs = None, "none", None
    checkpointed = parse_checkpoint(model, checkpoint) if train else ()
    return Options(
        inputs=specs,
        optimizer=opt_factory,
        optimizer_name=opt_name,
        optimizer_kwargs=dict(optimizer_kwargs or {}),
        amp_dtype=amp_dtype,
        dtype=param_dtype,
        loss_fn=loss_fn,
        device=dev,
        steps=steps,
        accumulation_steps=accumulation_steps,
        train=train,
        gpu=card,
        checkpoint=checkpointed,
        alloc_conf=alloc_conf,
    )


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
