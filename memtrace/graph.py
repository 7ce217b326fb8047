"""The traced step as a ``torch.fx`` graph of aten ops, each node annotated with the memory it moves.

``Report.graph()`` traces the step again with a ``Recorder`` told of every op the tracer sees (the copy of
the parameters, forward, loss, backward, optimizer, every iteration), in the order they ran, as
``make_fx`` would record them without functionalization: in-place ops are nodes whose result stands for
the tensor they modified, tensors the step did not make (parameters, buffers, inputs as created) are
placeholders. Each ``call_function`` node's ``meta["memtrace"]`` holds:

- ``op_index``: the op's number in the trace (``Report.timeline.ops``);
- ``module``, ``phase``, ``iteration``: where it ran;
- ``allocated_bytes`` / ``freed_bytes``: what the allocator model charges for the allocations and frees
  recorded from the end of the op before to the end of this one: its outputs, the scratch and workspaces
  the device's rules give it, and what was released since the op before (a tensor dropped when a Python
  variable is reassigned, an autograd node's saved tensors after it ran); the frees after the last op are
  on the output node;
- ``live_bytes``: the device's allocated bytes after those events (the report's timeline), and
  ``peak_bytes`` the most they reached among them (an op's scratch is freed before it ends);
- ``allocations``: the report's allocation indices made there.

The graph is built only when asked for: a report pays nothing for it.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from typing import Any

import torch
import torch.fx

_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class Recorder:
    """Builds the graph while the tracer runs; holds no tensor alive (the trace must not change)."""

    def __init__(self):
        self.graph = torch.fx.Graph()
        self._nodes: dict[int, tuple[weakref.ref, torch.fx.Node]] = {}  # id(tensor) -> (ref, node)
        self._inputs = 0
        self._last_input: torch.fx.Node | None = None
        self._spans: list[tuple[torch.fx.Node, int, int]] = []  # (node, first event, end) as the tracer counts
        self._events = 0
        self.spans: list[tuple[torch.fx.Node | None, int, int]] = []  # the same in the trace's event positions

    def finish(self, events: int, new_position: list[int]) -> None:
        """The trace is done (``events`` events, renumbered by ``new_position`` when the tracer fused
        gradient sums); the events after the last op belong to the graph's output."""
        spans = self._spans + [(None, self._events, events)]
        self.spans = [(node, new_position[a], new_position[b]) for node, a, b in spans]

    def _remember(self, t: torch.Tensor, node: torch.fx.Node) -> None:
        key = id(t)

        def gone(_ref, key=key):
            entry = self._nodes.get(key)
            if entry is not None and entry[0] is _ref:
                del self._nodes[key]

        self._nodes[key] = (weakref.ref(t, gone), node)
        node.meta.setdefault("shape", tuple(t.shape))
        node.meta.setdefault("dtype", t.dtype)

    def _arg(self, a: Any):
        if isinstance(a, torch.Tensor):
            entry = self._nodes.get(id(a))
            if entry is not None and entry[0]() is a:
                return entry[1]
            first = next(iter(self.graph.nodes), None)  # placeholders first, as a graph's inputs are
            where = (self.graph.inserting_after(self._last_input) if self._last_input is not None else
                     self.graph.inserting_before(first) if first is not None else contextlib.nullcontext())
            with where:
                node = self.graph.placeholder(f"tensor_{self._inputs}")
            self._last_input = node
            self._inputs += 1
            self._remember(a, node)
            return node
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a) if not hasattr(a, "_fields") else tuple(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        if isinstance(a, _LITERALS):
            return a
        return str(a)  # a generator, a symbolic size: shown, not replayable

    def record(self, func, args, kwargs, out, op_index: int, module: str, where, events: int) -> None:
        """Op ``func`` ran; the tracer holds ``events`` allocations and frees now."""
        node = self.graph.call_function(func, self._arg(tuple(args)), self._arg(dict(kwargs or {})))
        node.meta["memtrace"] = {"op_index": op_index, "module": module, "phase": where.phase.value,
                                 "iteration": where.iteration}
        self._spans.append((node, self._events, events))
        self._events = events
        if isinstance(out, torch.Tensor):
            self._remember(out, node)
        elif isinstance(out, (list, tuple)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["memtrace"] = dict(node.meta["memtrace"])
                    self._remember(t, item)


def annotate(graph: torch.fx.Graph, spans, trace, report) -> None:
    """Adds the bytes each op node allocates and frees, and the live bytes after it, from ``report`` (the
    report of ``trace``, whose events ``spans`` divides among the nodes)."""
    charged = {a.index: a.charged_bytes for a in report.allocations}
    live = 0
    out = next(n for n in graph.nodes if n.op == "output")
    for node, a, b in spans:
        allocated = freed = 0
        made = []
        highest = live
        for i, is_alloc in trace.events[a:b]:
            if trace.records[i].host:
                continue
            if is_alloc:
                allocated += charged.get(i, 0)
                made.append(i)
                highest = max(highest, live + allocated - freed)
            else:
                freed += charged.get(i, 0)
        live += allocated - freed
        info = (node if node is not None else out).meta.setdefault("memtrace", {})
        info.update(allocated_bytes=allocated, freed_bytes=freed, live_bytes=live, peak_bytes=highest,
                    allocations=tuple(made))


def step_graph(model: torch.nn.Module, options, rank: int = 0) -> torch.fx.GraphModule:
    """The step of ``model`` (rank ``rank`` of a parallel run) as an annotated ``GraphModule``."""
    from .engine import eager_module, trace
    from .report import build_report

    recorder = Recorder()
    t = trace(model, options, rank=rank, graph=recorder)
    report = build_report(eager_module(model), options, t)
    recorder.graph.output(None)
    annotate(recorder.graph, recorder.spans, t, report)
    return torch.fx.GraphModule(torch.nn.Module(), recorder.graph, class_name="TrainingStep")
