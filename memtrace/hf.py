"""The Hugging Face Trainer's step, predicted from its ``TrainingArguments``.

``memtrace.hf.report(trainer, seq_len=2048)`` (or ``(model, training_args, seq_len=...)``) reads what the
Trainer would do with the arguments and predicts that step:

- ``per_device_train_batch_size`` is the batch, ``gradient_accumulation_steps`` the micro-batches per
  optimizer step;
- ``bf16`` / ``fp16``: autocast in that dtype (fp16 with a GradScaler), as Accelerate runs the Trainer's step;
- ``gradient_checkpointing``: the model's repeated blocks under activation checkpointing;
- ``optim`` and its settings (``learning_rate``, ``weight_decay``, ``adam_beta1``, ``optim_args``, ...):
  transformers' own ``Trainer.get_optimizer_cls_and_kwargs`` chooses the class and its arguments (``adamw_torch``,
  ``adamw_torch_fused``, ``adafactor``, ``adamw_bnb_8bit``, ``paged_adamw_8bit``, ...), and the parameters are
  grouped as the Trainer groups them (weight decay on all but biases and norms, frozen parameters left out);
- ``torch_compile``: the compiled step.

Inputs are ``input_ids`` and ``labels`` of [batch, seq_len] (the Trainer's causal-LM batches; padding-free
batches have no attention mask). What the Trainer does that the prediction does not: gradient clipping
(``max_grad_norm``, a few 0-dim tensors per parameter group), and the ``fsdp`` / ``deepspeed`` settings, which are
refused: ``memtrace.report(parallel=...)`` predicts FSDP2 and DDP ranks.

``MemtraceCallback`` prints the prediction when training begins and, on a GPU, the measured peak after the
first steps beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .report import Report

# TrainingArguments fields read here (the CLI's --trainer-args file may hold these and no others that matter)
FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "gradient_checkpointing",
          "optim", "optim_args", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
          "torch_compile", "fsdp", "deepspeed", "max_grad_norm", "optim_target_modules")


def _model_and_args(trainer_or_model, training_args):
    if training_args is None:
        model = getattr(trainer_or_model, "model", None)
        args = getattr(trainer_or_model, "args", None)
        if model is None or args is None:
            raise TypeError("memtrace.hf.report(trainer) takes a transformers.Trainer, or (model, training_args)")
        return model, args
    return trainer_or_model, training_args


def training_arguments(source: Any):
    """The Trainer's arguments from a ``TrainingArguments``, a dict of its fields or a YAML/JSON file of them
    (what ``--trainer-args`` reads). A dict or file gives a namespace with ``TrainingArguments``' defaults for
    the fields it does not set: building ``TrainingArguments`` itself validates them for this machine
    (``bf16=True`` is refused where there is no GPU), and the prediction is for the machine that trains."""
    import dataclasses
    import types

    from transformers import TrainingArguments
    from transformers.training_args import OptimizerNames

    if isinstance(source, TrainingArguments) or isinstance(source, types.SimpleNamespace):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ValueError(f"{path} is YAML and PyYAML does not import here; give the same fields as "
                                 "JSON") from exc
            source = yaml.safe_load(text)
        else:
            source = json.loads(text)
    if not isinstance(source, dict):
        raise TypeError(f"training arguments must be a TrainingArguments, a dict or a YAML/JSON file of its "
                        f"fields, not {type(source).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(source) - set(fields))
    if unknown:
        raise ValueError(f"not TrainingArguments fields: {', '.join(unknown)}")
    values = {}
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            values[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[name] = f.default_factory()
        else:
            values[name] = None
    values.update(source)
    try:
        values["optim"] = OptimizerNames(values["optim"])
    except ValueError:
        raise ValueError(f"optim={values['optim']!r} is not one of the Trainer's optimizers: "
                         f"{', '.join(o.value for o in OptimizerNames)}") from None
    if values.get("gradient_checkpointing") is None:
        values["gradient_checkpointing"] = bool(values.get("activation_checkpointing"))
    return types.SimpleNamespace(**values)


def _trainer_optimizer(model: torch.nn.Module, args):
    """The optimizer the Trainer creates (``Trainer.create_optimizer``), as a callable of the parameter list
    memtrace passes (``model.named_parameters()`` order), and its name."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    names = [n for n, _ in model.named_parameters()]
    decay = set(Trainer.get_decay_parameter_names(None, model))
    weight_decay = args.weight_decay

    def trainer_optimizer(params):
        params = list(params)
        if len(params) != len(names):
            raise ValueError(f"expected the model's {len(names)} parameters, got {len(params)}")
        groups = [
            {"params": [p for n, p in zip(names, params) if n in decay and p.requires_grad],
             "weight_decay": weight_decay},
            {"params": [p for n, p in zip(names, params) if n not in decay and p.requires_grad],
             "weight_decay": 0.0},
        ]
        return cls([g for g in groups if g["params"]], **kwargs)

    name = cls.__name__
    if kwargs.get("optim_bits") == 8:
        name += " 8-bit"
    if kwargs.get("is_paged"):
        name = "paged " + name
    if kwargs.get("fused"):
        name += " (fused)"
    trainer_optimizer.__name__ = name
    return trainer_optimizer


def report_arguments(model: torch.nn.Module, training_args, *, seq_len: int | None = None,
                     inputs: Any = None) -> dict[str, Any]:
    """The ``memtrace.report`` keyword arguments of the Trainer's step: what ``report()`` here passes on."""
    args = training_arguments(training_args)
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        raise ValueError("the Trainer's fsdp= / deepspeed= settings are not predicted by memtrace.hf; "
                         "memtrace.report(model, parallel={'fsdp': N}) predicts one FSDP2 rank")
    if inputs is None:
        if seq_len is None:
            raise ValueError("give seq_len= (the length the data collator pads or packs to), or inputs=")
        from .loading import token_inputs

        inputs = token_inputs(model, args.per_device_train_batch_size, seq_len, "causal-lm")
    amp = "bf16" if args.bf16 else "fp16" if args.fp16 else False
    checkpointing = bool(getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing",
                                                                                   False))
    return {
        "inputs": inputs,
        "optimizer": _trainer_optimizer(model, args),
        "amp": amp,
        "accumulation_steps": args.gradient_accumulation_steps,
        "checkpoint": "auto" if checkpointing else None,
        "compile": True if args.torch_compile else None,
        "keep_output": False,  # training_step keeps only the loss through backward
    }


def report(trainer_or_model, training_args=None, *, seq_len: int | None = None, inputs: Any = None,
           **overrides) -> Report:
    """Predicts the Trainer's training step: ``report(trainer, seq_len=2048)`` or ``report(model, args,
    seq_len=2048)``. ``overrides`` go to ``memtrace.report`` after the arguments read from the Trainer's
    (``device``, ``gpu``, ``steps``, ``verify``, or any of those to change)."""
    model, args = _model_and_args(trainer_or_model, training_args)
    from . import report as memtrace_report

    kwargs = report_arguments(model, args, seq_len=seq_len, inputs=inputs)
    kwargs.update(overrides)
    return memtrace_report(model, **kwargs)


try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # memtrace.hf needs transformers; the rest of memtrace does not
    _CallbackBase = object


class MemtraceCallback(_CallbackBase):
    """A ``TrainerCallback`` that prints the predicted peak when training begins and, on a GPU, the measured
    ``max_memory_allocated`` after ``measure_after`` optimizer steps beside it::

        trainer = Trainer(model, args, ..., callbacks=[memtrace.hf.MemtraceCallback(seq_len=2048)])

    ``report_kwargs`` go to ``memtrace.hf.report`` (``gpu=``, ``device=``). The prediction is kept as
    ``callback.report``, the measurement as ``callback.measured_bytes``."""

    def __init__(self, seq_len: int | None = None, measure_after: int = 2, print_fn=print, **report_kwargs):
        self.seq_len, self.measure_after, self.print_fn = seq_len, measure_after, print_fn
        self.report_kwargs = report_kwargs
        self.report: Report | None = None
        self.measured_bytes: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .units import format_bytes

        if model is None or not state.is_world_process_zero:
            return
        kwargs = dict(self.report_kwargs)
        if torch.cuda.is_available() and "gpu" not in kwargs and kwargs.get("device", "cuda") == "cuda":
            from .gpus import present

            kwargs["gpu"] = present()
        self.report = report(model, args, seq_len=self.seq_len, **kwargs)
        self.print_fn(f"memtrace: predicted peak {format_bytes(self.report.peak_bytes)} "
                      f"({self.report.peak_bytes:,} B) per device for this Trainer's step")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        from .units import format_bytes

        if self.report is None or state.global_step != self.measure_after or not torch.cuda.is_available():
            return
        self.measured_bytes = torch.cuda.max_memory_allocated()
        error = 100.0 * (self.report.peak_bytes - self.measured_bytes) / self.measured_bytes
        self.print_fn(f"memtrace: measured peak {format_bytes(self.measured_bytes)} ({self.measured_bytes:,} B) "
                      f"after {state.global_step} steps; predicted {format_bytes(self.report.peak_bytes)} "
                      f"({error:+.2f}%)")


def qlora(model: torch.nn.Module, *, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
          compute_dtype: torch.dtype = torch.bfloat16, r: int | None = 16, alpha: int | None = None,
          dropout: float = 0.0, targets: Any = "all-linear", dora: bool = False,
          prepare: bool = False) -> torch.nn.Module:
    """``model`` as a QLoRA fine-tune sets it up, for a prediction: its Linears (but the output head) made
    bitsandbytes 4-bit layers as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)`` loads them (``bits=16``:
    left as they are), with ``prepare=True`` peft's ``prepare_model_for_kbit_training`` (the other
    weights made float32, input gradients on; the Trainer's checkpointing is its own argument), then peft LoRA
    adapters of rank ``r`` on ``targets`` (``r=None``: none). Works on a model built on the meta device (its
    weights are quantised on fake tensors when traced) and returns the new model."""
    from .quantized import quantize_4bit

    if bits == 4:
        model = quantize_4bit(model, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype)
    elif bits != 16:
        raise ValueError(f"bits={bits!r}: 4 (bitsandbytes 4-bit) or 16 (the weights as they are); 8-bit base "
                         "weights are not predicted yet")
    import warnings

    with warnings.catch_warnings():  # peft asks transformers for attributes each release renames
        warnings.simplefilter("ignore", FutureWarning)
        if prepare:
            import peft

            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if r is not None:
            import peft

            config = peft.LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                                     target_modules=targets, use_dora=dora,
                                     task_type="CAUSAL_LM" if hasattr(model, "get_output_embeddings") else None)
            model = peft.get_peft_model(model, config)
    return model
