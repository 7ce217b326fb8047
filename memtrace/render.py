"""Turns a ``Report`` into text: a summary and the per-layer table (one ``tabulate`` call each)."""

from __future__ import annotations

from tabulate import tabulate

from .options import Category
from .units import format_bytes


def _shape(shape) -> str:
    return "-" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def _bytes(n: int) -> str:
    return format_bytes(n) if n else "-"


def layer_table(report, depth: int = 3, fmt: str = "simple") -> str:
    rows = []
    for row in report.layers:
        if row.depth > depth:
            continue
        # tabulate strips leading spaces, so nesting is drawn, as torchinfo does
        label = ("│ " * (row.depth - 1) + "├─" if row.depth else "") + (
            row.name.rsplit(".", 1)[-1] if row.name else row.type)
        rows.append([
            label, row.type, _shape(row.output_shape), f"{row.params:,}" if row.params else "-",
            _bytes(row.param_bytes), _bytes(row.gradient_bytes), _bytes(row.optimizer_state_bytes),
            _bytes(row.activation_bytes),
        ])
    headers = ["Layer", "Type", "Output shape", "Params", "Param mem", "Grad mem", "Optim state", "Activations"]
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True,
                    colalign=("left", "left", "left", "right", "right", "right", "right", "right"))


def category_table(report, fmt: str = "simple") -> str:
    peak = report.peak_bytes or 1
    rows = [[c.value.replace("_", " "), format_bytes(n), f"{100 * n / peak:.1f}%"]
            for c, n in report.by_category.items() if n or c not in (Category.WORKSPACE, Category.COMMUNICATION)]
    rows.append(["total", format_bytes(report.peak_bytes), "100.0%"])
    return tabulate(rows, headers=["At the peak", "Bytes", "Share"], tablefmt=fmt, disable_numparse=True,
                    colalign=("left", "right", "right"))


def op_table(report, top: int = 20, fmt: str = "simple") -> str:
    """The ops whose allocations hold the most at the peak (``Report.by_op``), ``top`` rows and a total of
    the rest."""
    rows = report.by_op()
    peak = report.peak_bytes or 1
    shown = [[r.op, r.module or "(root)", f"{r.phase.value} (it {r.iteration})", r.category.value.replace("_", " "),
              str(r.allocations), format_bytes(r.bytes), f"{100 * r.bytes / peak:.1f}%"] for r in rows[:top]]
    rest = rows[top:]
    if rest:
        nbytes = sum(r.bytes for r in rest)
        shown.append([f"({len(rest)} more)", "", "", "", str(sum(r.allocations for r in rest)), format_bytes(nbytes),
                      f"{100 * nbytes / peak:.1f}%"])
    return tabulate(shown, headers=["Op at the peak", "Module", "Phase", "Category", "Allocations", "Bytes", "Share"],
                    tablefmt=fmt, disable_numparse=True,
                    colalign=("left", "left", "left", "left", "right", "right", "right"))


def _exact(n: int) -> str:
    return format_bytes(n, 2) + (f" ({n:,} B)" if n >= 1024 else "")


def _place(module: str) -> str:
    if module.startswith("("):  # (loss), (optimizer), (inputs): not a module
        return f"in the {module[1:-1]}"
    return f"in module '{module}'" if module else "in the root module"


def header_lines(report) -> list[str]:
    """What was predicted: the model, its parameters and the configuration of the step."""
    s = report.settings
    inputs = ", ".join(f"{i['key']}: [{', '.join(map(str, i['shape']))}] {i['dtype']}" for i in s["inputs"])
    mode = "training" if s["train"] else "inference"
    return [
        f"memtrace: {report.model} — {report.param_count:,} parameters ({report.trainable_param_count:,} trainable)",
        f"{mode} on {report.device}{' (' + s['gpu'] + ')' if s.get('gpu') else ''}, {report.allocator} "
        f"allocator model, optimizer {s['optimizer']}, "
        f"amp {s['amp']}, dtype {s['dtype']}, {s['steps']} step(s)"
        + (f" of {s['accumulation_steps']} accumulated micro-batches" if s.get("accumulation_steps", 1) > 1 else "")
        + (", compiled (torch.compile, Inductor)" if s.get("compile") is not None else "")
        + (", the output dropped before backward" if s.get("keep_output") is False else "")
        + (f"; inputs {inputs}" if inputs else ""),
    ]


def peak_lines(report) -> list[str]:
    """The predicted peak and where it happens, the measured one beside it, and the reserved estimate."""
    lines = [
        f"Predicted peak: {_exact(report.peak_bytes)} in iteration {report.peak.iteration}, "
        f"{report.peak.phase.value}, {_place(report.peak.module)} ({report.peak.op})",
    ]
    m = report.measured
    if m is not None:
        lines.append(f"Measured peak: {_exact(m.peak_bytes)} on {m.device_name or m.device}; prediction error "
                     f"{report.error_percent:+.2f}%")
        if getattr(m, "grad_scale", None) not in (None, 2.0 ** 16):
            lines.append(f"  (GradScaler skipped overflowing steps from its default scale; measured from scale "
                         f"{m.grad_scale:g}, where steps ran)")
        if getattr(m, "skipped_steps", 0):
            lines.append(f"  (GradScaler still skipped {m.skipped_steps} step(s) at scale {m.grad_scale:g}: the "
                         "measured run allocated no optimizer state for them)")
    if report.reserved_peak_bytes is not None:
        reserved = f"Reserved by the caching allocator (estimate): {format_bytes(report.reserved_peak_bytes, 2)}"
        if m is not None and m.reserved_peak_bytes is not None:
            reserved += f"; measured {format_bytes(m.reserved_peak_bytes, 2)}"
        lines.append(reserved)
    return lines


def summary(report) -> str:
    return "\n".join(header_lines(report) + peak_lines(report))


def notes_lines(report) -> list[str]:
    lines = []
    if report.assumptions:
        lines += ["Assumptions:"] + [f"  - {a}" for a in report.assumptions]
    if report.notes:
        lines += ([""] if lines else []) + ["Notes:"] + [f"  - {n}" for n in report.notes]
    return lines


def render_report(report, depth: int = 3) -> str:
    parts = [summary(report), "", category_table(report), "", layer_table(report, depth)]
    notes = notes_lines(report)
    return "\n".join(parts + ([""] + notes if notes else []))
