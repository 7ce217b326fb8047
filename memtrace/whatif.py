"""What-if: the same step under other settings (precision, optimizer, activation checkpointing), side by
side, and the levers that bring a step that does not fit under a memory limit. Every row is a real
``memtrace.report`` estimate of the changed step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate

from .engine import TraceError
from .targets import TORCH_VERSION
from .options import Category, model_dtypes, repeated_blocks
from .planning import DEFAULT_CAP, Batched, Estimates, MemoryLimit, limit_for, search
from .report import Report
from .units import format_bytes

# Named variants: the report options each one sets.
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": False, "dtype": torch.float32},
    "amp": {"amp": "fp16", "dtype": torch.float32},
    "fp16": {"amp": "fp16", "dtype": torch.float32},
    "bf16": {"amp": "bf16", "dtype": torch.float32},
    "sgd": {"optimizer": "sgd"},
    "adam": {"optimizer": "adam"},
    "adamw": {"optimizer": "adamw"},
    "checkpoint": {"checkpoint": "auto"},
    "compile": {"compile": True},
    "compile-budget": {"compile": {"activation_memory_budget": 0.5}},  # torch.compile, recomputing more
    "adamw8bit": {"optimizer": "adamw8bit"},  # bitsandbytes
    "paged-adamw8bit": {"optimizer": "paged_adamw8bit"},
    "qlora": {"model_setup": lambda model: _qlora_setup(model)},  # 4-bit nf4 base, LoRA r=16 (bitsandbytes, peft)
}
DEFAULT_VARIANTS = ("fp32", "amp", "bf16", "sgd", "adamw", "checkpoint")


def variant(spec: Any) -> tuple[str, dict[str, Any]]:
    """A variant as (label, report options): a name from ``VARIANTS``, names joined by "+" ("bf16+checkpoint"),
    a dict of report options (its "label" key names it), or a (label, dict) pair."""
    if isinstance(spec, str):
        merged: dict[str, Any] = {}
        for name in spec.split("+"):
            key = name.strip().lower()
            if key not in VARIANTS:
                raise ValueError(f"variant {name!r} is unknown; valid: {', '.join(map(repr, VARIANTS))}, names "
                                 "joined by '+', or a dict of memtrace.report options")
            merged.update(VARIANTS[key])
        return spec, merged
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return spec[0], dict(spec[1])
    if isinstance(spec, Mapping):
        overrides = {k: v for k, v in spec.items() if k != "label"}
        label = spec.get("label") or ", ".join(f"{k}={v}" for k, v in overrides.items()) or "as given"
        return str(label), overrides
    raise TypeError(f"variant {spec!r} must be a name, a dict of report options or a (label, dict) pair")


def _apply(options: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**options, **{k: v for k, v in overrides.items() if k != "model_setup"}}
    if "optimizer" in overrides and "optimizer_kwargs" not in overrides:
        merged.pop("optimizer_kwargs", None)  # another optimizer's keyword arguments need not fit this one
    if overrides.get("amp") not in (None, False) and "dtype" not in overrides:
        merged["dtype"] = torch.float32  # AMP trains float32 parameters
    return merged


def _set_up(model: torch.nn.Module, overrides: Mapping[str, Any]) -> torch.nn.Module:
    """The model a variant trains: ``overrides["model_setup"](model)`` (QLoRA: quantised, with adapters) on a
    copy, or the model itself."""
    setup = overrides.get("model_setup")
    if setup is None:
        return model
    import copy

    return setup(copy.deepcopy(model))


def _qlora_setup(model: torch.nn.Module) -> torch.nn.Module:
    from .hf import qlora

    return qlora(model, r=16)


def _fine_tuning_levers(model: torch.nn.Module, s: Mapping[str, Any], parallel: Any,
                        device: str) -> list[tuple[str, dict]]:
    """bitsandbytes' and peft's levers, where they import: an 8-bit AdamW and on CUDA a paged one in place of
    Adam's float32 state, and a full fine-tune as QLoRA (a 4-bit base with rank-16 adapters; it trains the adapters
    only)."""
    import importlib.util

    from . import quantized

    out: list[tuple[str, dict]] = []
    if importlib.util.find_spec("bitsandbytes") is None:
        return out
    if s["optimizer"] in ("Adam", "AdamW"):
        out.append(("8-bit AdamW (bitsandbytes)", {"optimizer": "adamw8bit"}))
        if device == "cuda":  # unified memory is CUDA's: on the CPU bitsandbytes runs it unpaged
            out.append(("paged 8-bit AdamW (large states in unified memory)", {"optimizer": "paged_adamw8bit"}))
    linears = any(type(m) is torch.nn.Linear and name.rsplit(".", 1)[-1] != "lm_head"
                  for name, m in model.named_modules())  # what quantize_4bit replaces (GPT-2's are Conv1D)
    trains_all = all(p.requires_grad for p in model.parameters())
    if (linears and trains_all and not quantized.uses_bitsandbytes(model) and parallel is None
            and importlib.util.find_spec("peft") is not None and hasattr(model, "get_output_embeddings")):
        out.append(("QLoRA: 4-bit base + LoRA r=16 (adapters only)", {"model_setup": _qlora_setup}))
    return out


def _moved(report: Report, base: Report, threshold: int) -> tuple[tuple[Category, int], ...]:
    """Categories at the peak that differ from the base by at least ``threshold`` bytes, largest first."""
    deltas = [(c, report.by_category[c] - base.by_category[c]) for c in Category]
    return tuple(sorted(((c, d) for c, d in deltas if abs(d) >= threshold), key=lambda cd: -abs(cd[1])))


def _moved_text(moved) -> str:
    return ", ".join(f"{c.value.replace('_', ' ')} {'+' if d > 0 else '−'}{format_bytes(abs(d))}" for c, d in moved) or "-"


@dataclass(frozen=True)
class VariantRow:
    label: str
    overrides: Mapping[str, Any]
    report: Report
    delta_bytes: int  # peak minus the first row's peak
    moved: tuple[tuple[Category, int], ...]  # categories at the peak that moved (>= 1% of the first peak)

    @property
    def peak_bytes(self) -> int:
        return self.report.peak_bytes


def _signed(n: int) -> str:
    return ("+" if n > 0 else "−" if n < 0 else "±") + format_bytes(abs(n), 2)


@dataclass(frozen=True)
class Comparison:
    rows: tuple[VariantRow, ...]

    def table(self, fmt: str = "simple") -> str:
        first = self.rows[0].peak_bytes or 1
        rows = [[r.label, format_bytes(r.peak_bytes, 2), "-" if i == 0 else _signed(r.delta_bytes),
                 "-" if i == 0 else f"{100 * r.delta_bytes / first:+.1f}%", "-" if i == 0 else _moved_text(r.moved)]
                for i, r in enumerate(self.rows)]
        return tabulate(rows, headers=["Variant", "Peak", f"vs {self.rows[0].label}", "Change", "What moved at the peak"],
                        tablefmt=fmt, disable_numparse=True, colalign=("left", "right", "right", "right", "left"))

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [{"label": r.label, "overrides": {k: str(v) for k, v in r.overrides.items()},
                          "peak_bytes": r.peak_bytes, "delta_bytes": r.delta_bytes,
                          "moved": {c.value: d for c, d in r.moved}} for r in self.rows]}


def compare(model: torch.nn.Module, input_shape: Any = None, *, inputs: Any = None,
            variants: Any = None, **options: Any) -> Comparison:
    """One estimate per variant of the step given by ``memtrace.report``'s arguments (``options``), with
    each row's peak against the first row's and the categories at the peak that moved. The default
    variants start from the model's own dtypes: "fp32" where it holds float32 parameters, else a row of
    the step as given."""
    if variants is None:
        held = model_dtypes(model, options.get("dtype")).describe()
        variants = DEFAULT_VARIANTS if held == "float32" else ({"label": f"{held} (as given)"}, *DEFAULT_VARIANTS)
    specs = [variant(v) for v in variants]
    if not specs:
        raise ValueError("variants= is empty; give at least one, e.g. ('fp32', 'bf16')")
    from . import report

    reports = [report(_set_up(model, o), input_shape, inputs=inputs, **_apply(options, o)) for _, o in specs]
    base = reports[0]
    threshold = max(1, base.peak_bytes // 100)
    return Comparison(tuple(VariantRow(label, o, r, r.peak_bytes - base.peak_bytes, _moved(r, base, threshold))
                            for (label, o), r in zip(specs, reports)))


# ---- levers --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lever:
    label: str
    overrides: Mapping[str, Any]
    report: Report
    saves_bytes: int  # the base peak minus this one's
    fits: bool
    note: str = ""


@dataclass(frozen=True)
class Levers:
    base: Report
    limit: MemoryLimit
    levers: tuple[Lever, ...]  # empty when the step fits already
    largest: Any = None  # planning.MaxBatch at these settings; None when the step fits already
    failed: tuple[tuple[str, str], ...] = ()  # (lever, why): levers whose step fails (as it would for real)

    @property
    def fits(self) -> bool:
        return self.base.peak_bytes <= self.limit.limit_bytes

    def table(self, fmt: str = "simple") -> str:
        over = self.base.peak_bytes - self.limit.limit_bytes
        if over <= 0:
            return (f"Fits: predicted peak {format_bytes(self.base.peak_bytes, 2)}, {format_bytes(-over, 2)} under the "
                    f"{self.limit.describe()}")
        head = (f"Does not fit: predicted peak {format_bytes(self.base.peak_bytes, 2)} is {format_bytes(over, 2)} "
                f"over the {self.limit.describe()}. Levers, each estimated:")
        if self.largest is not None and not self.largest.fits:
            head += f"\n(No smaller batch helps: {self.largest.headline()[0].lower()}{self.largest.headline()[1:]}.)"
        rows = [[lv.label, format_bytes(lv.report.peak_bytes, 2), format_bytes(lv.saves_bytes, 2) if lv.saves_bytes >= 0
                 else "+" + format_bytes(-lv.saves_bytes, 2), "yes" if lv.fits else "no", lv.note]
                for lv in self.levers]
        table = tabulate(rows, headers=["Lever", "Peak", "Saves", "Fits", "Note"], tablefmt=fmt,
                         disable_numparse=True, colalign=("left", "right", "right", "left", "left"))
        failed = "".join(f"\n{label}: not estimated, its step fails: {why}" for label, why in self.failed)
        return head + "\n\n" + table + ("\n" + failed if failed else "")

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "peak_bytes": self.base.peak_bytes, "limit": self.limit.to_dict(),
                "levers": [{"label": lv.label, "overrides": {k: str(v) for k, v in lv.overrides.items()},
                            "peak_bytes": lv.report.peak_bytes, "saves_bytes": lv.saves_bytes, "fits": lv.fits,
                            "note": lv.note} for lv in self.levers],
                "max_batch_size": None if self.largest is None else self.largest.batch_size,
                "failed": [{"label": label, "error": why} for label, why in self.failed]}


def _candidates(model: torch.nn.Module, base: Report, options: Mapping[str, Any],
                compile_levers: bool = False) -> list[tuple[str, dict]]:
    """The settings that can lower memory and are not in use already; torch.compile's only when asked for
    (each compiles the model with Inductor: seconds for a small model, minutes for a large one)."""
    s = base.settings
    out = []
    if s["amp"] == "off" and s["dtype"] == "float32":
        out += [("AMP fp16", {"amp": "fp16"}), ("AMP bf16", {"amp": "bf16"})]
    if s["optimizer"] not in ("SGD", "none"):
        out.append(("SGD (no optimizer state)", {"optimizer": "sgd"}))
        if hasattr(torch.optim, "Adafactor") and s["optimizer"] != "Adafactor":
            out.append(("Adafactor (factored state)", {"optimizer": torch.optim.Adafactor}))
    if not s.get("checkpoint") and repeated_blocks(model):
        out.append(("activation checkpointing", {"checkpoint": "auto"}))
    out += _fine_tuning_levers(model, s, options.get("parallel"), base.device)
    parallel = options.get("parallel")
    if (compile_levers and s.get("compile") is None and parallel is None and not s.get("checkpoint")
            and TORCH_VERSION >= (2, 6)):
        out += [("torch.compile", {"compile": True}),
                ("torch.compile, activation memory budget 0.5", {"compile": {"activation_memory_budget": 0.5}})]
    if isinstance(parallel, Mapping) and parallel.get("ddp", 1) > 1:
        n = parallel["ddp"]
        out.append((f"FSDP instead of DDP (shard across the {n} ranks)", {"parallel": {"fsdp": n}}))
        if not parallel.get("zero") and s["optimizer"] not in ("SGD", "none"):
            out.append(("ZeRO-1 (ZeroRedundancyOptimizer: the optimizer state sharded)",
                        {"parallel": {**parallel, "zero": 1}}))
        if not parallel.get("gradient_as_bucket_view"):
            out.append(("DDP gradient_as_bucket_view (gradients in the buckets, no copy)",
                        {"parallel": {**parallel, "gradient_as_bucket_view": True}}))
    if isinstance(parallel, Mapping) and parallel.get("fsdp", 1) > 1:
        n = parallel["fsdp"]
        out.append((f"shard wider (FSDP {n} → {2 * n} ranks)", {"parallel": {**parallel, "fsdp": 2 * n}}))
        if parallel.get("reshard_after_forward") is False:
            out.append(("reshard after forward", {"parallel": {**parallel, "reshard_after_forward": True}}))
        if parallel.get("mp_policy") is None and s["dtype"] == "float32" and s["amp"] == "off":
            out.append(("FSDP bf16 parameters (MixedPrecisionPolicy)", {"parallel": {
                **parallel, "mp_policy": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}}))
        if parallel.get("tp", 1) == 1 and n % 2 == 0 and _has_tp_plan(model):
            out.append((f"add tensor parallel (FSDP {n // 2} x TP 2, the same {n} ranks)",
                        {"parallel": {**parallel, "fsdp": n // 2, "tp": 2}}))
    return out


def _changed(parallel: Mapping[str, Any], given: Mapping[str, Any]) -> set[str]:
    return {k for k, v in parallel.items() if v != given.get(k)}


def _has_tp_plan(model: torch.nn.Module) -> bool:
    """A model that carries a tensor-parallel plan (a Hugging Face model's)."""
    return bool(getattr(model, "_tp_plan", None)
                or getattr(getattr(model, "config", None), "base_model_tp_plan", None))


def _is_ddp(parallel: Mapping[str, Any]) -> bool:
    return parallel.get("ddp", 1) > 1


def _accumulation_lever(model, batched, options: Mapping[str, Any], mem, largest: int, add,
                        tries: int = 3) -> None:
    """Gradient accumulation keeping the batch: k micro-batches of ceil(batch / k), from the fewest the
    largest fitting batch allows. Estimated with the accumulation, since the summed gradients are live while
    later micro-batches run backward, so a micro-batch that fits alone may not fit accumulated."""
    from . import report

    given, already = batched.batch_size, options.get("accumulation_steps", 1)
    k = math.ceil(given / largest)
    for attempt in range(tries):
        micro = math.ceil(given / k)
        overrides = {"batch_size": micro, "accumulation_steps": already * k}
        r = report(model, **batched.at(micro), **{**options, "accumulation_steps": already * k})
        if r.peak_bytes <= mem.limit_bytes or micro == 1 or attempt == tries - 1:
            note = "keeps the batch" if micro * k == given else f"batch {micro * k} per step"
            add(f"{k} × {micro} (gradient accumulation)", overrides, r, note)
            return
        k += 1


def levers(model: torch.nn.Module, input_shape: Any = None, *, inputs: Any = None, limit: Any = None,
           gpu: Any = None, context_bytes: Any = None, fragmentation: float | None = None,
           cap: int = DEFAULT_CAP, compile_levers: bool = False, **options: Any) -> Levers:
    """When the step does not fit ``limit`` (or ``gpu``'s usable memory), what each lever saves and whether it
    brings the step under: a smaller batch (the largest that fits), the batch as accumulated micro-batches,
    AMP fp16 / bf16, an optimizer with less state, activation checkpointing, with ``compile_levers=True``
    torch.compile (and with an activation memory budget of 0.5), and all of those together when none is
    enough alone."""
    from . import report

    mem = limit_for(options, limit, gpu, context_bytes, fragmentation)
    batched = Batched(None, input_shape, inputs)
    estimate = Estimates(model, batched, options)
    base = estimate(batched.batch_size)
    if base.peak_bytes <= mem.limit_bytes:
        return Levers(base, mem, ())
    found = []

    def add(label, overrides, r, note=""):
        found.append(Lever(label, overrides, r, base.peak_bytes - r.peak_bytes, r.peak_bytes <= mem.limit_bytes, note))

    largest = search(estimate, mem, batched.batch_size, cap)
    if largest.fits:
        given = batched.batch_size
        add(f"batch {given} → {largest.batch_size}", {"batch_size": largest.batch_size}, largest.report)
        _accumulation_lever(model, batched, options, mem, largest.batch_size, add)
    candidates, failed = [], []
    for label, overrides in _candidates(model, base, options, compile_levers):
        try:
            lever_model = _set_up(model, overrides)
        except Exception as exc:  # the model cannot be set up so (peft has no rule for its layers, say)
            failed.append((label, f"setting the model up failed: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"))
            continue
        try:
            r = report(lever_model, **batched.at(batched.batch_size), **_apply(options, overrides))
        except TraceError as exc:  # the step with this lever fails (tensor parallel with fused AdamW, say)
            failed.append((label, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
            continue
        except ValueError:
            before, after = options.get("parallel"), overrides.get("parallel")
            if not (isinstance(before, Mapping) and isinstance(after, Mapping)
                    and after.get("tp", 1) != before.get("tp", 1)):
                raise
            continue  # the model's dimensions do not divide by the tensor-parallel degree: not a lever for it
        add(label, overrides, r)
        candidates.append((label, overrides))
    if len(candidates) > 1 and not any(lv.fits for lv in found[1 if largest.fits else 0:]):
        together: dict[str, Any] = {}
        used = []
        for label, overrides in candidates:
            clash = ({"compile", "checkpoint"} <= set(together) | set(overrides)  # not predicted together
                     or any(key in together and key in overrides for key in ("amp", "optimizer", "compile", "model_setup")))
            if not clash:
                if "parallel" in together and "parallel" in overrides:  # the sharding levers combine
                    if _is_ddp(together["parallel"]) != _is_ddp(overrides["parallel"]):
                        continue  # FSDP instead of DDP, listed first, is kept: DDP's own levers do not apply
                    if _changed(together["parallel"], options["parallel"]) & _changed(overrides["parallel"],
                                                                                     options["parallel"]):
                        continue  # both change the same setting (shard wider; add tensor parallel)
                    overrides = {"parallel": {**together["parallel"], **{
                        k: v for k, v in overrides["parallel"].items() if v != options["parallel"].get(k)}}}
                together.update(overrides)
                used.append(label)
        try:
            r = report(_set_up(model, together), **batched.at(batched.batch_size), **_apply(options, together))
        except TraceError as exc:
            failed.append((" + ".join(used), str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
        else:
            add(" + ".join(used), together, r)
    return Levers(base, mem, tuple(found), largest, tuple(failed))
