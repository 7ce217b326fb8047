"""The training step, written once and run both on fake tensors (to predict) and on real ones (to measure).

Because prediction and measurement execute the same Python, the references the loop keeps alive
(the previous iteration's output and loss while the next forward runs) are the same in both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .options import Options, Phase


class LossError(ValueError):
    pass


def default_loss(output: Any, inputs: Any) -> torch.Tensor:
    """``output.loss`` when the model computed one (Hugging Face with labels); the sum of a dict of scalar
    losses (a torchvision detector in training returns one); else the mean of its first floating-point
    tensor."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    if (isinstance(output, Mapping) and output
            and all(isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point() for v in output.values())):
        return sum(output.values())
    for t in _tensors(output):
        if t.is_floating_point():
            return t.float().mean() if t.dtype in (torch.float16, torch.bfloat16) else t.mean()
    raise LossError("the model's output holds no floating-point tensor to reduce into a loss; pass loss_fn=")


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def build_optimizer(options: Options, params: list[torch.nn.Parameter], adjust=None) -> torch.optim.Optimizer | None:
    if options.optimizer is None:
        return None
    try:
        opt = options.optimizer(params, **options.optimizer_kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"optimizer_kwargs={dict(options.optimizer_kwargs)!r} rejected by {options.optimizer_name}: {exc}"
        ) from exc
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer callable returned {type(opt).__name__}, expected a torch.optim.Optimizer")
    if adjust is not None:
        adjust(opt)
    return opt


def autocast(options: Options, device_type: str):
    if options.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=options.amp_dtype)


def run_steps(
    model: torch.nn.Module,
    options: Options,
    new_inputs: Callable[[], tuple[list, dict]],
    optimizer: torch.optim.Optimizer | None,
    scaler: Any,
    autocast_device: str,
    on_phase: Callable[[Phase, int], None] = lambda phase, it: None,
) -> None:
    """``options.steps`` iterations of forward, loss, backward, optimizer step and zero_grad; with
    ``options.accumulation_steps`` = k, each iteration runs k forwards and backwards (the loss divided by
    k, the gradients summed into ``.grad``) before the optimizer step."""
    loss_fn = options.loss_fn or default_loss
    grad_ctx = contextlib.nullcontext if options.train else torch.no_grad
    micro_batches = options.accumulation_steps
    out = loss = None  # kept alive across iterations, as in a user's loop
    for it in range(options.steps):
        for _ in range(micro_batches):
            on_phase(Phase.FORWARD, it)
            args, kwargs, batch = new_inputs()
            with grad_ctx(), autocast(options, autocast_device):
                out = model(*args, **kwargs)
                if not options.train:
                    continue
                loss = loss_fn(out, batch)
                if micro_batches > 1 and isinstance(loss, torch.Tensor):
                    loss = loss / micro_batches
                if not options.keep_output:  # the Trainer's step: of the output, only the loss through backward
                    out = None
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise LossError(f"loss_fn must return a scalar tensor, got {shape}")
            on_phase(Phase.BACKWARD, it)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if not options.train:
            continue
        on_phase(Phase.OPTIMIZER, it)
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
        else:
            model.zero_grad(set_to_none=True)
    del out, loss, args, kwargs, batch
