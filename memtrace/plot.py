"""A picture of the step: allocated bytes over the traced ops, stacked by category, phases and peak marked.

``stacked_bytes`` computes the data (no matplotlib needed) and ``plot`` draws it. matplotlib is an
optional extra (``pip install memtrace[plot]``), imported only when a picture is drawn. The figure is
drawn on its own Agg canvas, without pyplot: nothing opens a window, and the caller's pyplot backend and
figures are left as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

from .options import Category, Phase
from .units import format_bytes

# Bottom to top: what lives through the whole step first, so the moving parts ride on a steady base.
STACK_ORDER = (
    Category.PARAMETER, Category.BUFFER, Category.OPTIMIZER_STATE, Category.GRADIENT, Category.WORKSPACE,
    Category.COMMUNICATION, Category.INPUT, Category.ACTIVATION, Category.TEMPORARY,
)
COLORS = {
    Category.PARAMETER: "#4e79a7", Category.BUFFER: "#a0cbe8", Category.OPTIMIZER_STATE: "#f28e2b",
    Category.GRADIENT: "#59a14f", Category.WORKSPACE: "#bab0ac", Category.INPUT: "#b07aa1",
    Category.ACTIVATION: "#e15759", Category.TEMPORARY: "#edc948", Category.COMMUNICATION: "#76b7b2",
}
PHASE_COLORS = {Phase.SETUP: "#f2f2f2", Phase.FORWARD: "#dbe9f6", Phase.BACKWARD: "#fde3cf",
                Phase.OPTIMIZER: "#e2f0d9"}
PHASE_SHORT = {Phase.SETUP: "setup", Phase.FORWARD: "fwd", Phase.BACKWARD: "bwd", Phase.OPTIMIZER: "opt"}
UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


@dataclass(frozen=True)
class StackedBytes:
    """Bytes live per category after each event of the report's timeline (one column per event)."""

    ops: tuple[int, ...]  # traced op index at each event
    by_category: dict[Category, tuple[int, ...]]  # in STACK_ORDER

    def total(self, event: int) -> int:
        return sum(column[event] for column in self.by_category.values())

    def columns(self, events) -> StackedBytes:
        """The same series at the given events only."""
        return StackedBytes(tuple(self.ops[e] for e in events),
                            {c: tuple(col[e] for e in events) for c, col in self.by_category.items()})


def stacked_bytes(report) -> StackedBytes:
    """Each allocation's charged bytes added to its category at its alloc event and taken off at its free.

    The stack's top is ``report.timeline.allocated_bytes`` at every event (checked)."""
    n = len(report.timeline.allocated_bytes)
    deltas = {c: [0] * n for c in STACK_ORDER}
    for a in report.allocations:
        deltas[a.category][a.alloc_event] += a.charged_bytes
        if a.free_event is not None:
            deltas[a.category][a.free_event] -= a.charged_bytes
    by_category = {}
    for c, d in deltas.items():
        total, column = 0, []
        for x in d:
            total += x
            column.append(total)
        by_category[c] = tuple(column)
    stacked = StackedBytes(tuple(report.timeline.ops), by_category)
    top = [sum(col[e] for col in by_category.values()) for e in range(n)]
    if top != list(report.timeline.allocated_bytes):
        raise ValueError("the report's allocations do not add up to its timeline")
    return stacked


def downsample(stacked: StackedBytes, max_points: int) -> list[int]:
    """Events to draw: in each of ``max_points // 2`` equal runs of events, the lowest and the highest total.

    The highest of all is the highest of its run, so the peak is always drawn; so are the dips between."""
    totals = [sum(v) for v in zip(*stacked.by_category.values())]
    n = len(totals)
    if n <= max_points:
        return list(range(n))
    bins = max(1, max_points // 2)
    keep = set()
    for b in range(bins):
        lo, hi = b * n // bins, (b + 1) * n // bins
        if lo == hi:
            continue
        run = range(lo, hi)
        keep.add(min(run, key=totals.__getitem__))
        keep.add(max(run, key=totals.__getitem__))
    keep.add(n - 1)
    return sorted(keep)


def _unit(nbytes: int) -> tuple[str, int]:
    for name, size in UNITS:
        if nbytes >= size:
            return name, size
    return UNITS[-1]


def _figure(figsize: tuple[float, float], dpi: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("report.plot() needs matplotlib: pip install memtrace[plot]") from None
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _place(module: str) -> str:
    if module.startswith("("):
        return f"in the {module[1:-1]}"
    return f"in {module}" if module else "in the root module"


def _title(report) -> str:
    s = report.settings
    inputs = ", ".join(f"{'input' if isinstance(i['key'], int) else i['key']} [{'×'.join(map(str, i['shape']))}]"
                       for i in s["inputs"])
    device = report.device + (f" ({s['gpu']})" if s.get("gpu") else "")
    amp = "" if s["amp"] == "off" else f", amp {s['amp']}"
    mode = s["optimizer"] if s["train"] else "inference"
    return f"{report.model} on {device}: {inputs}, {mode}{amp}, {s['steps']} step(s)"


def plot(report, path: str | PathLike, *, title: str | None = None, figsize: tuple[float, float] = (12, 5.5),
         dpi: int = 110, max_points: int = 3000) -> None:
    """Draw the step's allocated bytes over its traced ops, stacked by category, into ``path`` (PNG, SVG, PDF…).

    Phases are shaded and labelled per iteration; the peak is marked with its value, phase and module.
    Long timelines are drawn from at most ``max_points`` events, the lowest and highest of each run, so
    the peak and the dips survive."""
    fig = _figure(figsize, dpi)
    stacked = stacked_bytes(report)
    n = len(stacked.ops)
    unit, scale = _unit(max(report.peak_bytes, 1))
    shown = stacked.columns(downsample(stacked, max_points)) if n else stacked
    x = list(shown.ops)

    grid = fig.add_gridspec(2, 1, height_ratios=(1, 14), hspace=0.0, left=0.065, right=0.80, top=0.90,
                            bottom=0.11)
    band, ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    fig.suptitle(title if title is not None else _title(report), fontsize=11, x=0.065, ha="left")

    bottom = [0.0] * len(x)
    handles = []
    for c in STACK_ORDER:
        column = shown.by_category[c]
        if not any(stacked.by_category[c]):
            continue
        top = [b + v / scale for b, v in zip(bottom, column)]
        handles.append((ax.fill_between(x, bottom, top, step="post", color=COLORS[c], linewidth=0), c))
        bottom = top
    ax.plot(x, bottom, drawstyle="steps-post", color="#333333", linewidth=0.6)

    x_end = (stacked.ops[-1] + 1) if n else 1
    _phases(report, stacked, band, ax, x_end)
    peak_x = stacked.ops[report.peak.event] if n else 0
    _mark_peak(report, ax, peak_x, report.peak_bytes / scale, x_end)

    ax.set_xlim(0, x_end)
    ax.set_ylim(0, report.peak_bytes / scale * 1.18 if report.peak_bytes else 1)
    ax.set_ylabel(f"allocated ({unit})")
    ax.set_xlabel(f"traced op ({report.traced_ops:,} ops, {n:,} allocations and frees)")
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    _side_panel(report, fig, ax, handles)
    fig.savefig(path, dpi=dpi)


def _side_panel(report, fig, ax, handles) -> None:
    """Right of the plot, top to bottom: the categories at the peak, the phase colours, the peak's place."""
    labels = [f"{c.value.replace('_', ' ')}  {format_bytes(report.by_category.get(c, 0))}" for _, c in handles]
    style = {"loc": "upper left", "frameon": False, "fontsize": 9, "title_fontsize": 9, "alignment": "left"}
    categories = ax.legend([h for h, _ in reversed(handles)], list(reversed(labels)), title="at the peak",
                           bbox_to_anchor=(1.01, 1.0), **style)
    ax.add_artist(categories)
    renderer = fig.canvas.get_renderer()
    below = categories.get_window_extent(renderer).transformed(ax.transAxes.inverted()).y0
    phases = sorted({span.phase for span in report.timeline.phases}, key=list(Phase).index)
    patches = [matplotlib_patch(PHASE_COLORS[p]) for p in phases]
    legend = ax.legend(patches, [p.value for p in phases], title="phases", bbox_to_anchor=(1.01, below - 0.03),
                       **style)
    below = legend.get_window_extent(renderer).transformed(fig.transFigure.inverted()).y0
    peak = report.peak
    x0 = legend.get_window_extent(renderer).transformed(fig.transFigure.inverted()).x0
    fig.text(x0 + 0.005, below - 0.03, f"peak {format_bytes(report.peak_bytes, 2)}\niteration {peak.iteration}, "
             f"{peak.phase.value}\n{_place(peak.module)}\n{_short_op(peak.op)}", fontsize=9, va="top", ha="left")


def _short_op(op: str, width: int = 34) -> str:
    """The op without its ``.default`` overload, broken after a dot or underscore where it is long."""
    op = op.removesuffix(".default")
    lines = []
    while len(op) > width:
        cut = max(op.rfind(".", 0, width), op.rfind("_", 0, width)) + 1 or width
        lines.append(op[:cut])
        op = op[cut:]
    return "\n".join(lines + [op])


def matplotlib_patch(color: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor="#bbbbbb", linewidth=0.5)


def _phases(report, stacked: StackedBytes, band, ax, x_end: int) -> None:
    """Shade each phase span on the plot and label it in the band above, as long a label as fits."""
    band.set_xlim(0, x_end)
    band.set_ylim(0, 1)
    band.axis("off")
    renderer = band.figure.canvas.get_renderer()
    last_iteration = None
    for span in report.timeline.phases:
        if span.start_event >= len(stacked.ops) or span.end_event <= span.start_event:
            continue
        x0 = stacked.ops[span.start_event]
        x1 = stacked.ops[span.end_event] if span.end_event < len(stacked.ops) else x_end
        color = PHASE_COLORS[span.phase]
        ax.axvspan(x0, x1, color=color, zorder=0, linewidth=0)
        band.axvspan(x0, x1, color=color, linewidth=0)
        if last_iteration is not None and span.iteration != last_iteration:
            ax.axvline(x0, color="#888888", linewidth=0.8, linestyle="--", zorder=3)
        last_iteration = span.iteration
        name = span.phase.value if span.phase is Phase.SETUP else f"{span.phase.value} {span.iteration}"
        short = PHASE_SHORT[span.phase] + ("" if span.phase is Phase.SETUP else str(span.iteration))
        for label in (name, short):  # or none: the phase legend names the colours
            text = band.text((x0 + x1) / 2, 0.5, label, ha="center", va="center", fontsize=8, color="#333333")
            width = text.get_window_extent(renderer).width
            span_px = band.transData.transform((x1, 0))[0] - band.transData.transform((x0, 0))[0]
            if width <= span_px - 4:
                break
            text.remove()


def _mark_peak(report, ax, x: float, y: float, x_end: int) -> None:
    """A marker on the peak and its value just above it, inside the plot (the details sit beside the legend)."""
    ax.plot([x], [y], marker="v", color="black", markersize=6, zorder=5)
    ha = "right" if x > 0.9 * x_end else "left" if x < 0.1 * x_end else "center"
    ax.annotate(f"peak {format_bytes(report.peak_bytes, 2)}", xy=(x, y), xytext=(0, 7), textcoords="offset points",
                ha=ha, va="bottom", fontsize=9, fontweight="bold", zorder=6)
