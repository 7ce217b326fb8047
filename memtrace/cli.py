"""The ``memtrace`` command: the report of one model named on the command line, as tables, Markdown or JSON.

Exit status: 0 success, 1 the model failed to build or trace, 2 a usage error, 3 the predicted peak is over
``--budget``. Every error is one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Sequence

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OVER_BUDGET = 0, 1, 2, 3

SIZE_HELP = "sizes: '16GiB', '16 GiB' and '16G' are 16 * 2**30 bytes; '16GB' is 16 * 10**9 bytes"

EPILOG = f"""\
MODEL forms:
  torchvision.models:resnet50          a callable in an importable module
  examples/models.py:small_resnet      a callable in a Python file
  hf:LlamaConfig                       a Hugging Face model built from a configuration class
                                       (--model-kwargs override its fields; --task picks the head)
  path/to/config.json, path/to/dir     a Hugging Face model from a local configuration (no download)
Models are built on the meta device where the factory allows it: nothing of their size is allocated.

examples:
  memtrace torchvision.models:resnet50 --input-shape 3,224,224 --batch-size 64 --amp fp16
  memtrace hf:LlamaConfig --model-kwargs '{{"num_hidden_layers": 4}}' --seq-len 2048 --batch-size 8 --amp bf16
  memtrace examples/models.py:tiny_gpt --seq-len 1024 --batch-size 8 --format json
  memtrace torchvision.models:resnet18 --input-shape 3,224,224 --batch-size 256 --budget 24GiB

{SIZE_HELP}. Exit status: 0 success, 1 the model failed to build or trace, 2 usage error,
3 predicted peak over --budget.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
    pass


def _size(text: str) -> int:
    from .units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"lr\": 0.01}}', got {text!r}")
    return value


def _dims(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"cannot read shape {text!r}: write positive integers like 3,224,224")
    return tuple(int(p) for p in parts)


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _variants(text: str) -> list[str]:
    from .whatif import variant

    names = [v.strip() for v in text.split(",") if v.strip()]
    try:
        for name in names:
            variant(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError("give at least one variant, e.g. fp32,bf16")
    return names


def _data_dependent(text: str):
    from .datadep import SizePolicy

    text = text.strip()
    if text.startswith("{"):
        value = _json_object(text)
    else:
        try:
            value = float(text)
        except ValueError:
            value = text
    try:
        SizePolicy(value)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("data_dependent=")) from None
    return value


def _gpu(text: str):
    from .gpus import lookup

    try:
        return lookup(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("gpu=")) from None


def _dtype(text: str) -> torch.dtype:
    from .options import DTYPES

    names = {**DTYPES, "long": torch.long, "int64": torch.long, "int32": torch.int32, "int": torch.int32,
             "bool": torch.bool, "uint8": torch.uint8}
    if text.lower() not in names:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; valid: {', '.join(names)}")
    return names[text.lower()]


def _named_input(text: str) -> tuple[str | None, tuple[int, ...], torch.dtype | None]:
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = None, text
    elif not name.isidentifier():
        raise argparse.ArgumentTypeError(f"input name {name!r} in {text!r} is not an identifier")
    dims, _, dtype = rest.partition(":")
    return name, _dims(dims), _dtype(dtype) if dtype else None


def build_parser() -> argparse.ArgumentParser:
    from .loading import TASKS
    from .options import BITSANDBYTES_OPTIMIZERS, OPTIMIZERS

    p = _Parser(prog="memtrace", description="Predict the GPU memory of a PyTorch training step, without a GPU.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="the callable that builds the model (forms below)")
    p.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword arguments of the factory, or fields of a Hugging Face configuration")
    p.add_argument("--task", choices=list(TASKS), help="Hugging Face head to build (default: from the configuration)")

    inp = p.add_argument_group("inputs")
    inp.add_argument("--input-shape", type=_dims, metavar="DIMS",
                     help="shape of one input tensor without the batch dimension (3,224,224) when --batch-size "
                          "is given, else the full shape")
    inp.add_argument("--batch-size", type=_positive, metavar="N", help="batch size (default 1 with --seq-len)")
    inp.add_argument("--input-dtype", type=_dtype, metavar="DTYPE",
                     help="dtype of --input-shape's tensor (default: the parameter dtype)")
    inp.add_argument("--seq-len", type=_positive, metavar="N",
                     help="token models: input_ids [batch, N] (and labels where the model takes them)")
    inp.add_argument("--input", dest="inputs", action="append", type=_named_input, default=[],
                     metavar="[NAME=]DIMS[:DTYPE]",
                     help="an input tensor with its full shape, e.g. input_ids=8,1024:long; repeat for several; "
                          "named ones are passed as keywords")
    inp.add_argument("--images", type=_dims, metavar="N,C,H,W",
                     help="detection models (torchvision's R-CNNs, RetinaNet, FCOS, SSD): a list of N images of "
                          "C x H x W and, in training, a list of N targets with --boxes boxes each")
    inp.add_argument("--boxes", type=_positive, default=4, metavar="K",
                     help="with --images: boxes per target (default 4; masks and keypoints are added for the "
                          "models that take them)")

    tr_data = p.add_argument_group("sizes that depend on tensor values")
    tr_data.add_argument("--data-dependent", type=_data_dependent, metavar="POLICY",
                         help="how the size of an op sized by values (nonzero, masks, NMS) is chosen: 'upper' (the "
                              "largest it allows, the default), a fraction such as 0.25, or a JSON object of "
                              "'module:op' patterns to sizes, e.g. '{\"rpn:nms\": 1000}'")

    tr = p.add_argument_group("training step")
    tr.add_argument("--optimizer", default="adam", choices=[*OPTIMIZERS, *BITSANDBYTES_OPTIMIZERS, "none"])
    tr.add_argument("--optimizer-kwargs", type=_json_object, default=None, metavar="JSON")
    tr.add_argument("--amp", choices=["off", "fp16", "bf16"], default="off", help="automatic mixed precision")
    tr.add_argument("--dtype", type=_dtype, default=None,
                    help="convert the parameters to this dtype, as model.to(dtype) would (default: as the model "
                         "holds them)")
    tr.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device to predict (default cuda)")
    tr.add_argument("--gpu", type=_gpu, help="the card of a CUDA run (default H100): decides kernels, workspaces "
                                             "and whether it fits")
    tr.add_argument("--steps", type=_positive, default=2, help="training iterations to trace (default 2)")
    tr.add_argument("--accumulation-steps", type=_positive, default=1, metavar="K",
                    help="gradient accumulation: K micro-batches of --batch-size per optimizer step (default 1)")
    tr.add_argument("--alloc-conf", metavar="CONF",
                    help="CUDA caching-allocator settings to predict for, as in PYTORCH_CUDA_ALLOC_CONF "
                         "(e.g. expandable_segments:True; default: the environment's)")
    tr.add_argument("--inference", action="store_true", help="forward only, no gradients or optimizer")
    tr.add_argument("--checkpoint", nargs="?", const="auto", metavar="NAMES",
                    help="activation checkpointing of the model's repeated blocks, or of the modules named "
                         "(comma-separated dotted names)")
    tr.add_argument("--verify", action="store_true", help="also run the real step on this machine's GPU and show "
                                                          "the measured peak")
    tr.add_argument("--compile", action="store_true",
                    help="the compiled step: the forward through torch.compile (Dynamo, AOTAutograd's partitioner, "
                         "Inductor's buffer plan)")
    tr.add_argument("--compile-levers", action="store_true",
                    help="the levers also try torch.compile, and with an activation memory budget of 0.5 (each "
                         "compiles the model with Inductor)")
    tr.add_argument("--activation-memory-budget", type=float, metavar="X",
                    help="with --compile: AOTAutograd's activation memory budget (0 to 1; 1, the default, saves "
                         "what the min-cut partitioner chooses, lower recomputes more in backward)")

    ft = p.add_argument_group("fine-tuning (bitsandbytes and peft; memtrace.hf)")
    ft.add_argument("--quantize", choices=["nf4", "fp4"],
                    help="load the Linears (but the output head) as bitsandbytes 4-bit layers, as "
                         "BitsAndBytesConfig(load_in_4bit=True) does, with double quantisation and bfloat16 compute")
    ft.add_argument("--no-double-quant", action="store_true", help="with --quantize: statistics not quantised again")
    ft.add_argument("--prepare-kbit", action="store_true",
                    help="peft's prepare_model_for_kbit_training: the weights not quantised made float32")
    ft.add_argument("--lora-r", type=_positive, metavar="R", help="peft LoRA adapters of rank R (all Linears)")
    ft.add_argument("--lora-targets", metavar="NAMES", default="all-linear",
                    help="with --lora-r: comma-separated module names for the adapters (default all-linear)")
    ft.add_argument("--dora", action="store_true", help="with --lora-r: DoRA adapters")
    ft.add_argument("--trainer-args", metavar="FILE",
                    help="a YAML or JSON file of Hugging Face TrainingArguments fields: the batch, accumulation, "
                         "bf16/fp16, gradient_checkpointing and optim are read from it (with --seq-len)")

    par = p.add_argument_group("sharded and data-parallel training (the report is one rank's; "
                               "--input-shape/--batch-size are one rank's micro-batch)")
    par.add_argument("--fsdp", type=_positive, metavar="N",
                     help="FSDP2 (fully_shard) across N ranks: each repeated block, then the root")
    par.add_argument("--replicate", type=_positive, metavar="R",
                     help="HSDP: R replicas of the --fsdp group (R x N ranks)")
    par.add_argument("--fsdp-units", metavar="NAMES",
                     help="the modules fully_shard wraps before the root: comma-separated module names or class "
                          "names (default: the repeated blocks)")
    par.add_argument("--no-reshard-after-forward", action="store_true",
                     help="keep each block's gathered parameters from forward to backward")
    par.add_argument("--mp-param-dtype", type=_dtype, metavar="DTYPE",
                     help="FSDP2 MixedPrecisionPolicy param_dtype (the dtype parameters are gathered in)")
    par.add_argument("--mp-reduce-dtype", type=_dtype, metavar="DTYPE",
                     help="MixedPrecisionPolicy reduce_dtype (the dtype gradients are reduced in)")
    par.add_argument("--tp", type=_positive, metavar="N",
                     help="tensor parallel across N ranks (with --fsdp: N x the FSDP ranks), with the model's own "
                          "plan (a Hugging Face model's) or --tp-plan")
    par.add_argument("--tp-plan", metavar="JSON",
                     help='the tensor-parallel plan: module name patterns to styles, e.g. '
                          '\'{"layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"}\'')
    par.add_argument("--ddp", type=_positive, metavar="N",
                     help="DistributedDataParallel across N ranks (every rank holds the whole model)")
    par.add_argument("--bucket-cap-mb", type=float, metavar="MB",
                     help="DDP's bucket_cap_mb: the size of its gradient buckets (default 25)")
    par.add_argument("--gradient-as-bucket-view", action="store_true",
                     help="DDP's gradient_as_bucket_view: the gradients are views of its buckets")
    par.add_argument("--no-broadcast-buffers", action="store_true",
                     help="DDP's broadcast_buffers=False: no broadcast of the module's buffers before each forward")
    par.add_argument("--zero", type=int, choices=(1,), metavar="1",
                     help="with --ddp: ZeRO stage 1, the optimizer state sharded across the ranks "
                          "(ZeroRedundancyOptimizer)")
    ask = p.add_argument_group("questions (each adds a table; the limit is --budget, else --gpu's usable memory)")
    ask.add_argument("--max-batch", action="store_true",
                     help="the largest batch size that fits (the search starts at --batch-size)")
    ask.add_argument("--fits", action="store_true",
                     help="for every GPU in the catalog: fits at this batch size, headroom, largest batch")
    ask.add_argument("--compare", type=_variants, metavar="VARIANTS",
                     help="one row per variant, e.g. fp32,amp,bf16,sgd,adamw,checkpoint ('+' combines: bf16+sgd)")
    ask.add_argument("--dataset-size", type=_positive, metavar="N",
                     help="plan an epoch of N samples: iterations, FLOPs, a lower bound on its time")
    ask.add_argument("--samples-per-second", type=_positive_float, metavar="X",
                     help="with --dataset-size: a measured throughput, for a realistic epoch time")
    ask.add_argument("--no-levers", action="store_true",
                     help="do not estimate what would bring a step that does not fit under the limit")

    out = p.add_argument_group("output")
    out.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    out.add_argument("--depth", type=int, default=2, metavar="N", help="deepest layer level shown (default 2)")
    out.add_argument("--allocations", action="store_true", help="JSON: include every allocation")
    out.add_argument("--by-op", type=int, nargs="?", const=20, default=None, metavar="N",
                     help="the N ops (default 20) whose allocations hold the most at the peak, with their module, "
                          "phase and category; in JSON, every op")
    out.add_argument("--budget", type=_size, metavar="SIZE",
                     help="exit with status 3 when the predicted peak is over SIZE (e.g. 24GiB)")
    out.add_argument("--plot", metavar="PNG", help="draw the step's memory over time (needs matplotlib)")
    out.add_argument("--snapshot", metavar="PICKLE",
                     help="write the predicted allocations as a CUDA memory snapshot, for pytorch.org/memory_viz")
    out.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _inputs(args, built) -> dict[str, Any]:
    """``input_shape=`` or ``inputs=`` for memtrace.report, as meta tensors."""
    given = [n for n, v in (("--input-shape", args.input_shape), ("--seq-len", args.seq_len),
                            ("--input", args.inputs), ("--images", args.images)) if v]
    if len(given) > 1:
        raise UsageError(f"give the input one way: {' and '.join(given)} were both given")
    if not given:
        raise UsageError("no input: give --input-shape (e.g. 3,224,224 with --batch-size 64), --seq-len, --input, "
                         "or --images for a detection model")
    if args.images:
        from .loading import detection_inputs

        if len(args.images) != 4:
            raise UsageError(f"--images takes N,C,H,W (e.g. 2,3,800,800), got {','.join(map(str, args.images))}")
        if args.batch_size or args.input_dtype is not None:
            raise UsageError("--images gives the number of images itself; leave out --batch-size and --input-dtype")
        return {"inputs": detection_inputs(built.module, *args.images, boxes=args.boxes, train=not args.inference)}
    if args.input_shape:
        shape = ((args.batch_size,) if args.batch_size else ()) + args.input_shape
        if args.input_dtype is None:
            return {"input_shape": shape}
        return {"inputs": torch.empty(shape, dtype=args.input_dtype, device="meta")}
    if args.input_dtype is not None:
        raise UsageError("--input-dtype goes with --input-shape; with --input write NAME=DIMS:DTYPE")
    if args.seq_len:
        from .loading import token_inputs

        return {"inputs": token_inputs(built.module, args.batch_size or 1, args.seq_len, built.task)}
    if args.batch_size:
        raise UsageError("--batch-size goes with --input-shape or --seq-len; --input takes full shapes")
    from .options import model_dtypes

    positional, named = [], {}
    float_dtype = model_dtypes(built.module, args.dtype).input  # floating inputs in the parameters' dtype
    for name, shape, dtype in args.inputs:
        t = torch.empty(shape, dtype=dtype or float_dtype, device="meta")
        if name is None:
            if named:
                raise UsageError("positional --input after a named one")
            positional.append(t)
        else:
            named[name] = t
    if positional and named:
        raise UsageError("mix of positional and named --input: name them all, or none")
    return {"inputs": named if named else positional[0] if len(positional) == 1 else tuple(positional)}


def _fit_line(report, gpu, budget: int | None) -> list[str]:
    from .units import format_bytes

    lines = []
    if gpu is not None:
        usable = gpu.usable_bytes()
        room = usable - report.peak_bytes
        where = (f"{gpu.name} ({format_bytes(usable)} usable of {format_bytes(gpu.memory_bytes)}, after the CUDA "
                 f"context and a fragmentation allowance)")
        lines.append(f"Fits {where}: {format_bytes(room)} headroom" if room >= 0
                     else f"Does not fit {where}: over by {format_bytes(-room)}")
    if budget is not None:
        room = budget - report.peak_bytes
        lines.append(f"Within the budget of {format_bytes(budget)}: {format_bytes(room)} headroom" if room >= 0
                     else f"Over the budget of {format_bytes(budget)} by {format_bytes(-room)}")
    return lines


ANSWER_TITLES = {"max_batch": None, "fits": "What fits where", "compare": "What if", "epoch": "Epoch plan",
                 "levers": None}  # None: the table starts with its own headline


def render(report, gpu, args, answers: dict[str, Any] | None = None) -> str:
    """The command's text: header, per-layer table, breakdown at the peak, the peak, whether it fits, then
    the answers to the questions asked (largest batch, fits, what-if, epoch, levers)."""
    from .render import category_table, header_lines, layer_table, notes_lines, op_table, peak_lines

    fmt = "github" if args.format == "markdown" else "simple"
    text_blocks = [header_lines(report), [layer_table(report, args.depth, fmt)], [category_table(report, fmt)]]
    if getattr(args, "by_op", None):
        text_blocks.append([op_table(report, args.by_op, fmt)])
    text_blocks.append(peak_lines(report) + _fit_line(report, gpu, args.budget))
    for name, answer in (answers or {}).items():
        title = ANSWER_TITLES[name]
        text_blocks.append(([title + ":"] if title else []) + [answer.table(fmt)])
    notes = notes_lines(report)
    if notes:
        text_blocks.append(notes)
    if args.format == "markdown":
        # every line of prose its own paragraph; tables as they are
        blocks = []
        for block in text_blocks:
            if len(block) == 1 and "\n" in block[0]:
                blocks.append(block[0])
            else:
                blocks.append("\n\n".join(line.strip() if not line.startswith("  - ") else line[2:]
                                          for line in block if line))
        blocks[0] = "## " + blocks[0]
        return "\n\n".join(blocks)
    return "\n\n".join("\n".join(block) for block in text_blocks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except UsageError as exc:
        parser.error(str(exc))
    except BrokenPipeError:  # the reader went away (memtrace ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        if args.debug:
            raise
        from .engine import TraceError
        from .loading import ModelBuildError

        known = isinstance(exc, (TraceError, ModelBuildError))
        message = str(exc) if known else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        print(f"memtrace: error: {message}" + ("" if known else " (--debug shows the traceback)"), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE  # parser.error exits before this


def _run(args, parser) -> int:
    from .loading import ModelSpecError, build_model

    if args.device == "cpu" and args.gpu is not None:
        raise UsageError("--gpu names the card of a --device cuda run")
    if args.verify and args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--verify runs the real step on a CUDA GPU, and none is present here")
    if (args.max_batch or args.fits) and args.input_shape and not args.batch_size:
        raise UsageError("--max-batch and --fits vary the batch size: give --batch-size, with --input-shape as "
                         "the shape of one sample")
    if args.fits and args.device == "cpu":
        raise UsageError("--fits predicts a CUDA run on every card; leave out --device cpu")
    if args.max_batch and args.device == "cpu" and args.budget is None:
        raise UsageError("--max-batch on --device cpu needs --budget: there is no GPU memory to fill")
    if args.dataset_size is None and args.samples_per_second is not None:
        raise UsageError("--samples-per-second goes with --dataset-size")
    if args.dataset_size is not None and (args.device == "cpu" or args.inference):
        raise UsageError("--dataset-size plans a training epoch on a GPU; leave out --device cpu and --inference")
    try:
        built = build_model(args.model, args.model_kwargs, args.task)
    except ModelSpecError as exc:
        raise UsageError(str(exc)) from None
    built = _fine_tuned(args, built)
    if built.note:
        print(f"memtrace: note: {built.note}", file=sys.stderr)
    with _quiet_library(built):
        return _predict(args, built)


def _fine_tuned(args, built):
    """The model as --quantize / --prepare-kbit / --lora-r set it up."""
    if args.no_double_quant and not args.quantize:
        raise UsageError("--no-double-quant goes with --quantize")
    if (args.dora or args.lora_targets != "all-linear") and args.lora_r is None:
        raise UsageError("--dora and --lora-targets go with --lora-r")
    if not (args.quantize or args.prepare_kbit or args.lora_r):
        return built
    from dataclasses import replace

    from .hf import qlora

    targets = args.lora_targets if args.lora_targets == "all-linear" else [
        n.strip() for n in args.lora_targets.split(",") if n.strip()]
    model = built.module
    if args.dtype is not None:  # the checkpoint's dtype, before peft adds its float32 adapters
        model = model.to(args.dtype)
        args.dtype = None
    try:
        module = qlora(model, bits=4 if args.quantize else 16, quant_type=args.quantize or "nf4",
                       double_quant=not args.no_double_quant, r=args.lora_r, targets=targets, dora=args.dora,
                       prepare=args.prepare_kbit)
    except ImportError as exc:
        raise UsageError(f"--quantize, --prepare-kbit and --lora-r need bitsandbytes and peft ({exc}); "
                         "pip install bitsandbytes peft") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return replace(built, module=module)


def _quiet_library(built):
    """Hugging Face models log warnings while traced (e.g. that checkpointing turns their cache off)."""
    if built.task is None:
        return contextlib.nullcontext()
    from .loading import quiet_transformers

    return quiet_transformers()


def _predict(args, built) -> int:
    import memtrace

    if args.trainer_args is not None:
        return _predict_trainer(args, built)
    inputs = _inputs(args, built)
    options = dict(optimizer=None if args.optimizer == "none" else args.optimizer,
                   optimizer_kwargs=args.optimizer_kwargs, amp=False if args.amp == "off" else args.amp,
                   dtype=args.dtype, device=args.device, steps=args.steps, train=not args.inference)
    if args.data_dependent is not None:
        options["data_dependent"] = args.data_dependent
    if args.accumulation_steps != 1:
        options["accumulation_steps"] = args.accumulation_steps
    if args.alloc_conf is not None:
        options["alloc_conf"] = args.alloc_conf
    parallel = _parallel(args)
    if parallel is not None:
        options["parallel"] = parallel
    if args.checkpoint is not None:
        options["checkpoint"] = "auto" if args.checkpoint == "auto" else [
            n.strip() for n in args.checkpoint.split(",") if n.strip()]
    if args.activation_memory_budget is not None and not args.compile:
        raise UsageError("--activation-memory-budget is AOTAutograd's: give it with --compile")
    if args.compile:
        options["compile"] = ({"activation_memory_budget": args.activation_memory_budget}
                              if args.activation_memory_budget is not None else True)
    try:
        report = memtrace.report(built.module, **inputs, **options, gpu=args.gpu, verify=args.verify)
    except (ValueError, TypeError) as exc:  # an argument memtrace.report refused: a usage error
        raise UsageError(str(exc)) from None

    gpu = _card(args)
    from .planning import progress

    with progress(sys.stderr) if sys.stderr.isatty() else contextlib.nullcontext():
        answers = _answers(args, built.module, inputs, options, report, gpu)
    return _show(args, report, gpu, answers)


def _card(args):
    """The card a CUDA prediction was made for; None for the CPU."""
    from .gpus import DEFAULT_GPU, lookup, present

    if args.device != "cuda":
        return None
    return args.gpu or (present() if args.verify else lookup(DEFAULT_GPU))


def _show(args, report, gpu, answers) -> int:
    """Prints the report and the answers as --format asks, says where files were written, and returns the exit
    status: over --budget, or not."""
    from .units import format_bytes

    if args.plot:
        report.plot(args.plot)
    if args.snapshot:
        report.save_snapshot(args.snapshot)
    if args.format == "json":
        out = report.to_dict(allocations=args.allocations)
        if args.by_op:
            out["by_op"] = [{"op": r.op, "module": r.module, "phase": r.phase.value, "iteration": r.iteration,
                             "category": r.category.value, "allocations": r.allocations, "bytes": r.bytes}
                            for r in report.by_op()]
        out.update({name: answer.to_dict() for name, answer in answers.items()})
        print(json.dumps(out, indent=2))
    else:
        print(render(report, gpu, args, answers))
    for path, what in ((args.plot, "picture of the step"), (args.snapshot, "memory snapshot")):
        if path:
            print(f"memtrace: wrote the {what} to {path}", file=sys.stderr)
    if args.budget is not None and report.peak_bytes > args.budget:
        print(f"memtrace: predicted peak {format_bytes(report.peak_bytes)} is over the budget of "
              f"{format_bytes(args.budget)} by {format_bytes(report.peak_bytes - args.budget)}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    return EXIT_OK


def _predict_trainer(args, built) -> int:
    """--trainer-args: the Trainer's step from its arguments (memtrace.hf), printed as a report."""
    import memtrace.hf

    given = [flag for flag, value in (("--batch-size", args.batch_size), ("--amp", args.amp != "off"),
                                      ("--optimizer", args.optimizer != "adam"), ("--checkpoint", args.checkpoint),
                                      ("--accumulation-steps", args.accumulation_steps != 1),
                                      ("--compile", args.compile), ("--inference", args.inference)) if value]
    if given:
        raise UsageError(f"{', '.join(given)}: read from --trainer-args (per_device_train_batch_size, bf16/fp16, optim, "
                         "gradient_checkpointing, gradient_accumulation_steps, torch_compile); leave them out")
    if args.seq_len is None:
        raise UsageError("--trainer-args needs --seq-len: the length the data collator pads or packs to")
    if args.max_batch or args.fits or args.compare or args.dataset_size or args.by_op or args.plot or args.snapshot:
        raise UsageError("--trainer-args prints the Trainer step's report; the questions (--max-batch, --fits, "
                         "--compare, ...) take the step's own flags")
    if _parallel(args) is not None:
        raise UsageError("--trainer-args predicts one device; the sharding flags go without it")
    try:
        trainer_args = memtrace.hf.training_arguments(args.trainer_args)
        report = memtrace.hf.report(built.module, trainer_args, seq_len=args.seq_len, dtype=args.dtype,
                                    device=args.device, steps=args.steps, gpu=args.gpu, verify=args.verify)
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return _show(args, report, _card(args), {})


def _parallel(args) -> dict | None:
    """``parallel=`` from the sharding flags, or None."""
    def refuse(flags, needs: str) -> None:
        for flag, value in flags:
            if value:
                raise UsageError(f"{flag} goes with {needs}")

    if args.ddp is not None and args.fsdp is not None:
        raise UsageError("--ddp and --fsdp are two ways to train on N ranks; for FSDP groups replicated across "
                         "ranks (HSDP) give --fsdp N --replicate R")
    if args.ddp is not None and args.tp is not None:
        raise UsageError("--ddp replicates the whole model on every rank; tensor parallel goes alone or with --fsdp")
    if args.ddp is None:
        refuse((("--bucket-cap-mb", args.bucket_cap_mb), ("--gradient-as-bucket-view", args.gradient_as_bucket_view),
                ("--no-broadcast-buffers", args.no_broadcast_buffers), ("--zero", args.zero)), "--ddp N")
    if args.fsdp is None:
        refuse((("--replicate", args.replicate), ("--fsdp-units", args.fsdp_units),
                ("--no-reshard-after-forward", args.no_reshard_after_forward),
                ("--mp-param-dtype", args.mp_param_dtype), ("--mp-reduce-dtype", args.mp_reduce_dtype)), "--fsdp N")
    if args.tp is None:
        refuse((("--tp-plan", args.tp_plan),), "--tp N")
    parallel: dict[str, Any] = {}
    if args.ddp is not None:
        parallel["ddp"] = args.ddp
        for key, value in (("bucket_cap_mb", args.bucket_cap_mb),
                           ("gradient_as_bucket_view", args.gradient_as_bucket_view or None),
                           ("broadcast_buffers", False if args.no_broadcast_buffers else None), ("zero", args.zero)):
            if value is not None:
                parallel[key] = value
    if args.fsdp is not None:
        parallel["fsdp"] = args.fsdp
        if args.replicate:
            parallel["replicate"] = args.replicate
        if args.fsdp_units:
            parallel["units"] = [n.strip() for n in args.fsdp_units.split(",") if n.strip()]
        if args.no_reshard_after_forward:
            parallel["reshard_after_forward"] = False
        mp = {k: v for k, v in (("param_dtype", args.mp_param_dtype), ("reduce_dtype", args.mp_reduce_dtype)) if v}
        if mp:
            parallel["mp_policy"] = mp
    if args.tp is not None:
        parallel["tp"] = args.tp
        if args.tp_plan:
            try:
                parallel["tp_plan"] = json.loads(args.tp_plan)
            except ValueError as exc:
                raise UsageError(f"--tp-plan is not JSON: {exc}") from None
    return parallel or None


def _answers(args, model, inputs, options, report, gpu) -> dict[str, Any]:
    """The questions asked on the command line, answered from new estimates with the same options; each
    result has ``table()`` and ``to_dict()``."""
    import memtrace

    answers: dict[str, Any] = {}
    card = {"gpu": args.gpu} if args.gpu is not None else {}
    if args.max_batch:
        answers["max_batch"] = memtrace.max_batch_size(model, **inputs, limit=args.budget, **card, **options)
    if args.fits:
        cuda_options = {k: v for k, v in options.items() if k != "device"}
        answers["fits"] = memtrace.fits(model, **inputs, **cuda_options)
    if args.compare:
        answers["compare"] = memtrace.compare(model, **inputs, variants=args.compare, **card, **options)
    if args.dataset_size is not None:
        answers["epoch"] = memtrace.plan_epoch(report=report, dataset_size=args.dataset_size, gpu=args.gpu,
                                               samples_per_second=args.samples_per_second)
    limit = args.budget if args.budget is not None else (gpu.usable_bytes() if gpu is not None else None)
    if limit is not None and report.peak_bytes > limit and not args.no_levers and not args.inference:
        if sys.stderr.isatty():  # someone is waiting; scripts keep --budget's one line
            print("memtrace: the step does not fit; estimating the levers that would bring it under (one "
                  "estimate each; --no-levers skips them)", file=sys.stderr)
        answers["levers"] = memtrace.levers(model, **inputs, limit=args.budget, **card, **options,
                                            compile_levers=args.compile_levers)
    return answers


if __name__ == "__main__":
    sys.exit(main())
