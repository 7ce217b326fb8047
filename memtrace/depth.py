"""Deep models from a few of their layers: the trace of a stack of N identical layers from traces of 2, 3 and 4.

A transformer's layers (an ``nn.ModuleList`` or ``nn.Sequential`` of modules of one type with the same
parameters, buffers and settings, the layer's own index aside) repeat their records: the trace at depth
3 is the trace at depth 2 with one layer's records and frees inserted, at the same places (in forward,
in backward, in every foreach op of the optimizer, in the copy of the parameters). ``splice`` traces the
model cut to its first 2 and 3 layers, finds the inserted records (the depth-2 trace, its last layer
renumbered, is a subsequence of the depth-3 trace record for record and event for event), and builds the
trace at any depth by inserting that many copies. Nothing is assumed: the splice must rebuild the depth-3
trace exactly, and rebuild a trace at depth 4, traced too, exactly (every record, event, op number, phase
boundary, module, parameter, gradient and state table, sized call, FLOP count and note); otherwise
``NoSplice`` says why and the caller traces the whole model. The cost is three traces of 2, 3 and 4
layers instead of one of N.

What the check cannot see: behaviour that a layer takes from its index or from the model's configuration
only past the fourth layer (a model that reads ``config.layer_types[layer_idx]`` in forward, say). Layers
that store such a choice differ in their settings, and the stack is not spliced.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .engine import ModuleInfo, Trace, about_the_model, trace
from .options import Options, Phase
from .report import _canonical_events
from .tracer import StorageRecord

ENABLED = True  # report() and the answers splice where they can; False traces every layer
MIN_LAYERS = 16  # a shallower stack is traced whole: 2 + 3 + 4 layers and three times the rest cost as much
DEPTHS = (2, 3, 4)


class NoSplice(ValueError):
    """The traces at two depths do not line up, or the splice does not rebuild a traced depth; says where."""


# ---- the stack ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stack:
    path: str  # dotted name of the nn.ModuleList / nn.Sequential
    length: int


def _same_value(a: Any, b: Any, ia: int, ib: int) -> bool:
    """Whether two settings of layers ``ia`` and ``ib`` are the same, an int equal to each layer's own index
    (its ``layer_idx``) counting as the same."""
    if a is b:
        return True
    if isinstance(a, torch.nn.Module) and isinstance(b, torch.nn.Module):  # held outside the tree
        return _kind(a) == _kind(b) and _same_layers(a, b, ia, ib)
    if type(a) is not type(b):
        return False
    if isinstance(a, bool):
        return a == b
    if isinstance(a, int):
        return a == b or (a == ia and b == ib)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y, ia, ib) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_value(a[k], b[k], ia, ib) for k in a)
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.requires_grad == b.requires_grad
    if isinstance(a, str):  # a dotted path naming the layer itself (peft's target_name) counts as the same
        pa, pb = a.split("."), b.split(".")
        return len(pa) == len(pb) and all(x == y or (x == str(ia) and y == str(ib)) for x, y in zip(pa, pb))
    if isinstance(a, (float, complex, type(None), torch.dtype, torch.device, frozenset, set)):
        return a == b
    if callable(a):
        return False  # hooks, bound methods: per layer, their effect unknown
    try:
        return bool(a == b)
    except Exception:
        return False


def _kind(x: Any) -> tuple[str, str]:
    """A class by where it is defined: a class made inside a function (transformers' kernel wrappers) is a
    new class object at every call."""
    return type(x).__module__, type(x).__qualname__


def _same_layers(a: torch.nn.Module, b: torch.nn.Module, ia: int, ib: int) -> bool:
    ma, mb = list(a.named_modules(remove_duplicate=False)), list(b.named_modules(remove_duplicate=False))
    if [(n, _kind(m)) for n, m in ma] != [(n, _kind(m)) for n, m in mb]:
        return False
    for (_, x), (_, y) in zip(ma, mb):
        for table in ("_parameters", "_buffers"):
            tx, ty = getattr(x, table), getattr(y, table)
            if list(tx) != list(ty):
                return False
            for k in tx:
                p, q = tx[k], ty[k]
                if (p is None) != (q is None) or (p is not None and (
                        type(p) is not type(q) or p.shape != q.shape or p.dtype != q.dtype
                        or p.requires_grad != q.requires_grad or p.stride() != q.stride())):
                    return False
        vx = {k: v for k, v in vars(x).items() if k not in ("_parameters", "_buffers", "_modules")}
        vy = {k: v for k, v in vars(y).items() if k not in ("_parameters", "_buffers", "_modules")}
        if not _same_value(vx, vy, ia, ib):
            return False
    return True


def find_stack(model: torch.nn.Module, options: Options, min_layers: int | None = None) -> Stack | None:
    """The stack of identical layers (at least ``min_layers``, default ``MIN_LAYERS``) holding the most
    parameters, where splicing applies; None if there is none."""
    min_layers = MIN_LAYERS if min_layers is None else min_layers
    spec = options.parallel
    if spec is not None and (spec.plan is not None or not spec.shards):
        return None  # a user's plan (unknown); DDP's buckets span layers by size
    if options.compile is not None:
        return None  # Inductor fuses and plans across layers: a compiled step is traced whole
    best, best_params = None, -1
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    for name, module in model.named_modules():
        if not name or not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        children = list(module._modules.values())
        if len(children) < min_layers or list(module._modules) != [str(i) for i in range(len(children))]:
            continue
        if any(c is None or type(c) is not type(children[0]) for c in children):
            continue
        params = [p for c in children for _, p in c.named_parameters(remove_duplicate=False)]
        if not params or len({id(p) for p in params}) != len(params) or any(owners[id(p)] != 1 for p in params):
            continue  # shared weights (one layer used twice, tied across layers): not independent layers
        if not all(_same_layers(children[0], c, 0, i) for i, c in enumerate(children[1:], 1)):
            continue
        if not _checkpoints_repeat(name, len(children), options.checkpoint):
            continue
        if spec is not None and not _checkpoints_repeat(name, len(children), spec.units):
            continue  # FSDP2 units: every layer or none (and nothing inside one layer only)
        size = sum(p.numel() for p in params)
        if size > best_params:
            best, best_params = Stack(name, len(children)), size
    return best


def _layer(name: str, path: str) -> tuple[int, str] | None:
    """(layer index, the rest with its dot) of a name inside the stack, else None."""
    if not name.startswith(path + "."):
        return None
    k, dot, tail = name[len(path) + 1:].partition(".")
    return (int(k), dot + tail) if k.isdigit() else None


def _renamer(path: str, shift: Callable[[int], int]) -> Callable[[Any], Any]:
    def rename(name):
        if not isinstance(name, str):
            return name
        found = _layer(name, path)
        return name if found is None else f"{path}.{shift(found[0])}{found[1]}"
    return rename


def _checkpoints_repeat(path: str, length: int, names: tuple[str, ...]) -> bool:
    """Checkpointing (or FSDP2's units) is the same in every layer: each layer's named submodules, by
    relative name, and not the stack itself."""
    inside: list[set[str]] = [set() for _ in range(length)]
    for n in names:
        if n == path:
            return False
        found = _layer(n, path)
        if found is not None:
            inside[found[0]].add(found[1])
    return all(s == inside[0] for s in inside)


def with_depth(model: torch.nn.Module, path: str, depth: int) -> torch.nn.Module:
    """``model`` with the stack at ``path`` holding its first ``depth`` layers: shallow copies of the modules
    on the way to it, sharing everything else (parameters included) with ``model``."""
    parts = path.split(".")
    root = copy.copy(model)
    root._modules = copy.copy(model._modules)
    parent = root
    for part in parts[:-1]:
        child = copy.copy(parent._modules[part])
        child._modules = copy.copy(child._modules)
        parent._modules[part] = child
        parent = child
    stack = parent._modules[parts[-1]]
    short = copy.copy(stack)
    short._modules = type(stack._modules)((str(i), stack._modules[str(i)]) for i in range(depth))
    parent._modules[parts[-1]] = short
    # a method of a module on the way kept as an attribute (peft's PeftModel keeps the base model's
    # prepare_inputs_for_generation) is bound to the copy, not to the whole model
    copies = {id(model): root}
    original, shallow = model, root
    for part in parts:
        original, shallow = original._modules[part], shallow._modules[part]
        copies[id(original)] = shallow
    for module in copies.values():
        for key, value in list(vars(module).items()):
            if isinstance(value, types.MethodType) and id(value.__self__) in copies:
                setattr(module, key, types.MethodType(value.__func__, copies[id(value.__self__)]))
    return root


def _options_at(options: Options, path: str, depth: int) -> Options:
    def kept(names):
        return tuple(n for n in names if (_layer(n, path) or (0,))[0] < depth)

    spec = options.parallel
    return replace(options, checkpoint=kept(options.checkpoint),
                   parallel=None if spec is None else replace(spec, units=kept(spec.units)))


# ---- lining up two depths -----------------------------------------------------------------------------

_FIRST, _LAST, _INSERTED, _RELATIVE = "from the first", "from the last", "inserted", "relative"


def _tags(t: Trace) -> dict[int, tuple]:
    """Record index -> the tables that name it (parameter, gradient, state of which parameter)."""
    tags: dict[int, list] = {}
    for table in ("param_records", "grad_records", "state_records"):
        for name, v in getattr(t, table).items():
            for r in (v if isinstance(v, list) else [v]):
                tags.setdefault(r.index, []).append((table, name))
    return {k: tuple(v) for k, v in tags.items()}


class _View:
    """One traced depth seen layer by layer. Each record belongs to a layer (its module's, or the one of the
    parameter its gradient or state is) or to none, and is numbered among its layer's records; what an event
    refers to reads from where it happens: relative to the layer running (a layer's backward frees the
    previous layer's output), or, outside the stack, counted from the first or the last layer. The deeper
    trace's layer ``j`` is the inserted one."""

    def __init__(self, t: Trace, path: str, depth: int, j: int, deeper: bool):
        self.t, self.path, self.depth, self.j, self.deeper = t, path, depth, j, deeper
        self.tags = _tags(t)
        self.slot: list[int | None] = []
        self.local: list[tuple | None] = []  # (phase, iteration, module, op, number among the layer's such)
        counts: dict[tuple, int] = {}
        for r in t.records:
            s = self.layer_of(r.module)
            if s is None and r.index in self.tags:
                named = {self.layer_of(n) for _, n in self.tags[r.index]}
                s = named.pop() if len(named) == 1 else None
            if s is None and r.follows is not None:  # an optimizer temporary of a layer's parameter
                s = self.slot[r.follows]
            self.slot.append(s)
            if s is None:
                self.local.append(None)
                continue
            kind = (r.phase, r.iteration, self.plain(r.module), r.op, self.tags.get(r.index, ()) and
                    tuple((tb, self.plain(n)) for tb, n in self.tags[r.index]))
            n = counts.get((s, kind), 0)
            counts[(s, kind)] = n + 1
            self.local.append(kind + (n,))
        self.tokens = [self._token(r) for r in t.records]  # each record's, once: records and events use them

        # where each event happens: an allocation in its record's module's layer, a free in the layer of the
        # module running; a free outside any layer's module in the layer of the allocation before it (a
        # model's forward frees one layer's input after the next layer ran) and, in the optimizer, of the
        # allocation after it (a for-loop optimizer frees one parameter's temporaries while computing the
        # next one's). Allocations in the optimizer belong to the parameter's layer.
        self.ctx: list[int | None] = [None] * len(t.events)
        starts = [s for _, _, s in t.phase_starts] + [len(t.events)]
        for g, (phase, _, start) in enumerate(t.phase_starts):
            span = range(start, starts[g + 1])
            optimizer = phase is Phase.OPTIMIZER
            near = None
            for p in (reversed(span) if optimizer else span):
                i, is_alloc = t.events[p]
                if is_alloc:
                    self.ctx[p] = self.slot[i] if optimizer else self.layer_of(t.records[i].module)
                    near = self.slot[i]
                else:
                    module = self.layer_of(t.free_modules[p])
                    self.ctx[p] = near if module is None else module

    def layer_of(self, name) -> int | None:
        found = _layer(name, self.path) if isinstance(name, str) else None
        return None if found is None else found[0]

    def place(self, k: int | None) -> tuple | None:
        """A layer as seen from outside the stack."""
        if k is None:
            return None
        if self.deeper and k == self.j:
            return (_INSERTED,)
        if k < self.j:
            return (_FIRST, k)
        return (_LAST, k - (self.depth - 1))

    def plain(self, name):
        found = _layer(name, self.path) if isinstance(name, str) else None
        return name if found is None else f"{self.path}.#{found[1]}"

    def _token(self, r: StorageRecord) -> tuple:
        """A record's own fields, with the layer's index taken out of its names."""
        return (r.nbytes, r.birth, self.plain(r.module), r.phase, r.iteration, r.op, r.saved, r.role, r.host,
                tuple((tb, self.plain(n)) for tb, n in self.tags.get(r.index, ())))

    def ref(self, i: int, ctx: int | None, outside) -> tuple:
        """How record ``i`` reads from layer ``ctx`` (None: outside the stack); ``outside(i)`` names a record
        that belongs to no layer."""
        s = self.slot[i]
        if s is None:
            return ("outside", outside(i))
        if ctx is None:
            return ("layer", self.place(s), self.local[i])
        return ("layer", (_RELATIVE, s - ctx), self.local[i])

    def call_token(self, k: int, record_tokens: list) -> tuple:
        c = self.t.sized[k]
        category, module, phase, iteration = c.context
        return ("call", c.sizer, repr(c.arguments), c.persistent, category, self.plain(module),
                self.place(self.layer_of(module)), phase, iteration, tuple(record_tokens[i] for i in c.made))


def _items(t: Trace, key: str) -> list[tuple[str, int]]:
    """The trace's records (key "record_at") or events (key "event_at") in order, with each sized call as an
    item of its own where it was made: ("r", index) / ("c", call number)."""
    n = len(t.records) if key == "record_at" else len(t.events)
    out, calls = [], sorted(range(len(t.sized)), key=lambda k: (getattr(t.sized[k], key), k))
    ci = 0
    for q in range(n + 1):
        while ci < len(calls) and getattr(t.sized[calls[ci]], key) <= q:
            out.append(("c", calls[ci]))
            ci += 1
        if q < n:
            out.append(("r", q))
    return out


def _embed(a: list, b: list, what: str) -> list[int]:
    """For each item of ``a``, its position in ``b``: the earliest embedding of ``a`` as a subsequence."""
    out, k = [], 0
    for i, tok in enumerate(a):
        while k < len(b) and b[k] != tok:
            k += 1
        if k == len(b):
            raise NoSplice(f"the shallower trace's {what} {i} has no counterpart in the deeper one")
        out.append(k)
        k += 1
    return out


def _runs(b_items: list, matched: list[int]) -> dict[int, list]:
    """Shallower position -> the deeper items inserted before it (the end: after the last)."""
    before: dict[int, list] = {}
    taken = set(matched)
    p = 0
    for k, item in enumerate(b_items):
        if k in taken:
            p += 1
        else:
            before.setdefault(p, []).append(item)
    return before


def _segment(starts: list[int], pos: int) -> int:
    """The phase an event position belongs to."""
    g = 0
    for k, s in enumerate(starts):
        if s <= pos:
            g = k
    return g


class _Splice:
    """The depth-d₀ trace A and the depth-(d₀+1) trace B lined up: B is A with one layer inserted before A's
    last (``j = d₀ - 1``): its records, its events, and what its layer adds outside itself (its parameters'
    copies, gradient frees and optimizer temporaries)."""

    def __init__(self, a: Trace, b: Trace, path: str, depth_a: int, about_a: int, about_b: int):
        self.a, self.b, self.path, self.d0, self.about_a = a, b, path, depth_a, about_a
        self.j = j = depth_a - 1
        if a.rank_keys or b.rank_keys:
            raise NoSplice("the traces have per-rank keys")
        for t in (a, b):
            if t.shard_layout and len(t.shard_layout) != len(t.param_records):
                raise NoSplice("the shard layout is not one entry per parameter")
        if a.assumptions != b.assumptions:
            raise NoSplice("the data-dependent choices differ between depths")
        if a.target.name != b.target.name:
            raise NoSplice("the targets differ")
        if a.notes[about_a:] != b.notes[about_b:]:
            raise NoSplice("the notes differ between depths")
        if [(ph, it) for ph, it, _ in a.phase_starts] != [(ph, it) for ph, it, _ in b.phase_starts]:
            raise NoSplice("the phases differ")
        if len(a.free_modules) != len(a.events) or len(b.free_modules) != len(b.events):
            raise NoSplice("the traces do not say where each free happened")
        if set(a.flops) != set(b.flops):
            raise NoSplice("the phases with FLOPs differ")
        va, vb = self.va, self.vb = _View(a, path, depth_a, j, False), _View(b, path, depth_a + 1, j, True)

        # records, with the sized calls among them, in the order they were made
        def record_tokens(v: _View) -> list:
            return [("L", v.place(v.slot[i]), v.local[i], v.tokens[i]) if v.slot[i] is not None else ("U", v.tokens[i])
                    for i in range(len(v.t.records))]

        rta, rtb = record_tokens(va), record_tokens(vb)
        cta = [va.call_token(k, rta) for k in range(len(a.sized))]
        ctb = [vb.call_token(k, rtb) for k in range(len(b.sized))]
        self.ritems_a, self.ritems_b = _items(a, "record_at"), _items(b, "record_at")
        m = _embed([rta[i] if kind == "r" else cta[i] for kind, i in self.ritems_a],
                   [rtb[i] if kind == "r" else ctb[i] for kind, i in self.ritems_b], "allocation")
        self.rruns = _runs(self.ritems_b, m)
        self.rec_ab: dict[int, int] = {}
        for x, k in zip(self.ritems_a, m):
            if x[0] == "r":
                self.rec_ab[x[1]] = self.ritems_b[k][1]
        self.rec_ba = {v: k for k, v in self.rec_ab.items()}
        for kind, i in (x for run in self.rruns.values() for x in run):
            if kind == "r" and vb.slot[i] is not None and vb.slot[i] != j:
                raise NoSplice(f"allocation {i} ({b.records[i].op} in {b.records[i].module}) of a layer that is not "
                               "the inserted one has no counterpart in the shallower trace")

        # events, with the calls among them: what each refers to, read from where it happens
        def event_tokens(v: _View, items: list, record_tokens: list, outside) -> list:
            out = []
            for kind, i in items:
                if kind == "c":
                    out.append(("call", v.call_token(i, record_tokens)))
                    continue
                r, is_alloc = v.t.events[i]
                ctx = v.ctx[i]
                out.append((is_alloc, v.place(ctx), v.ref(r, ctx, outside), v.tokens[r]))
            return out

        self.eitems_a, self.eitems_b = _items(a, "event_at"), _items(b, "event_at")
        eta = event_tokens(va, self.eitems_a, rta, lambda i: ("matched", self.rec_ab[i]))
        etb = event_tokens(vb, self.eitems_b, rtb,
                           lambda i: ("matched", i) if i in self.rec_ba else ("new", vb.tokens[i]))
        positions = _embed(eta, etb, "event")
        self.eruns = _runs(self.eitems_b, positions)
        # op numbers: each A event's shift into B
        self.op_shift = []
        for x, k in zip(self.eitems_a, positions):
            y = self.eitems_b[k]
            oa = a.event_ops[x[1]] if x[0] == "r" else a.sized[x[1]].op_at
            ob = b.event_ops[y[1]] if y[0] == "r" else b.sized[y[1]].op_at
            self.op_shift.append(ob - oa)
        if any(s < 0 for s in self.op_shift) or self.op_shift != sorted(self.op_shift):
            raise NoSplice("the op numbers do not shift forward")
        # modules: B's are A's with layer j's inserted before A's layer j
        up = _renamer(path, lambda k: k + 1 if k >= j else k)
        in_j = [vb.layer_of(mi.name) == j for mi in b.modules]
        if [up(mi.name) for mi in a.modules] != [mi.name for mi, ins in zip(b.modules, in_j) if not ins]:
            raise NoSplice("the modules differ between depths")
        at = [k for k, ins in enumerate(in_j) if ins]
        if not at or at != list(range(at[0], at[0] + len(at))):
            raise NoSplice("the inserted layer's modules are not together")
        self.layer_modules = [b.modules[k] for k in at]
        self.modules_at = at[0]

    # ---- the trace at depth d0 + m ----

    def at(self, m: int, about: list[str]) -> Trace:
        a, b, path, j, va, vb = self.a, self.b, self.path, self.j, self.va, self.vb
        last = self.d0 + m - 1  # the last layer

        def final_a(k: int) -> int:
            return k if k < j else k + m

        def final_b(k: int, c: int) -> int:
            return k if k < j else j + c if k == j else k + m - 1

        rename_a = _renamer(path, final_a)

        def rename_b(c: int):
            return _renamer(path, lambda k: final_b(k, c))

        starts_b = [s for _, _, s in b.phase_starts]

        def copies(phases) -> list[int]:
            """The copies of a run in order: in backward the layers run last to first."""
            return list(range(m - 1, -1, -1)) if Phase.BACKWARD in phases else list(range(m))

        # records and calls, in the order they were made
        records: list[StorageRecord] = []
        of_a: dict[int, int] = {}
        of_b: dict[tuple[int, int], int] = {}
        layered: dict[tuple[int, int], int] = {}  # (final layer, number in it) -> final record
        calls: list[tuple] = []  # (SizedCall, copy or None, final record_at)

        def add(r: StorageRecord, rename, layer: int | None, local: int | None) -> int:
            k = len(records)
            records.append(replace(r, index=k, module=rename(r.module), alloc_event=0, free_event=None, follows=None))
            if layer is not None:
                layered[(layer, local)] = k
            return k

        def emit(run) -> None:
            phases = {b.records[i].phase if kind == "r" else b.sized[i].context[2] for kind, i in run}
            for c in copies(phases):
                for kind, i in run:
                    if kind == "r":
                        s = vb.slot[i]
                        of_b[(i, c)] = add(b.records[i], rename_b(c), None if s is None else final_b(s, c),
                                           vb.local[i])
                    else:
                        calls.append((b.sized[i], c, len(records), i))

        for p, (kind, i) in enumerate(self.ritems_a):
            emit(self.rruns.get(p, []))
            if kind == "r":
                s = va.slot[i]
                of_a[i] = add(a.records[i], rename_a, None if s is None else final_a(s), va.local[i])
            else:
                calls.append((a.sized[i], None, len(records), i))
        emit(self.rruns.get(len(self.ritems_a), []))

        def resolve(ref: tuple, ctx: int | None, c: int | None) -> int:
            """The final record a reference read in final layer ``ctx`` names (``c``: the copy it is read in)."""
            if ref[0] == "outside":
                how, i = ref[1]
                if how == "matched":
                    found = of_a.get(self.rec_ba[i]) if c is not None else of_a.get(i)
                else:
                    found = of_b.get((i, c))
            else:
                _, where, local = ref
                if where[0] == _RELATIVE:
                    layer = None if ctx is None else ctx + where[1]
                elif where[0] == _FIRST:
                    layer = where[1]
                elif where[0] == _LAST:
                    layer = last + where[1]
                else:
                    layer = None if c is None else j + c
                found = layered.get((layer, local))
            if found is None:
                raise NoSplice(f"a reference ({ref[0]}) names no allocation of the spliced trace")
            return found

        def a_ref(i: int, ctx: int | None) -> tuple:
            return va.ref(i, ctx, lambda r: ("matched", r))

        def b_ref(i: int, ctx: int | None) -> tuple:
            return vb.ref(i, ctx, lambda r: ("matched", r) if r in self.rec_ba else ("new", r))

        for key, k in list(of_a.items()) + list(of_b.items()):
            r = records[k]
            if r.sums_into is None:
                continue
            if isinstance(key, int):
                ctx = va.slot[key]
                r.sums_into = resolve(a_ref(r.sums_into, ctx), None if ctx is None else final_a(ctx), None)
            else:
                i, c = key
                ctx = vb.slot[i]
                r.sums_into = resolve(b_ref(r.sums_into, ctx), None if ctx is None else final_b(ctx, c), c)

        # events, with the calls among them
        events, event_ops, free_modules, segments = [], [], [], []
        call_event: dict[tuple, tuple[int, int]] = {}
        starts_a = [s for _, _, s in a.phase_starts]
        total_shift = b.op_count - a.op_count
        shifts = self.op_shift
        for p in range(len(self.eitems_a) + 1):
            run = self.eruns.get(p, [])
            if run:
                d1 = shifts[p - 1] if p > 0 else 0
                d2 = shifts[p] if p < len(shifts) else total_shift
                phases = {b.phase_starts[_segment(starts_b, i)][0] if kind == "r" else b.sized[i].context[2]
                          for kind, i in run}
                for slot, c in enumerate(copies(phases)):
                    for kind, i in run:
                        if kind == "c":
                            call_event[("b", i, c)] = (len(events), b.sized[i].op_at + (m - 1) * d1 + slot * (d2 - d1))
                            continue
                        ri, is_alloc = b.events[i]
                        module = b.records[ri].module if is_alloc else b.free_modules[i]
                        ctx = vb.ctx[i]
                        events.append((resolve(b_ref(ri, ctx), None if ctx is None else final_b(ctx, c), c), is_alloc))
                        event_ops.append(b.event_ops[i] + (m - 1) * d1 + slot * (d2 - d1))
                        free_modules.append(None if is_alloc else rename_b(c)(module))
                        segments.append(_segment(starts_b, i))
            if p == len(self.eitems_a):
                break
            kind, i = self.eitems_a[p]
            if kind == "c":
                call_event[("a", i)] = (len(events), a.sized[i].op_at + m * shifts[p])
                continue
            ri, is_alloc = a.events[i]
            module = a.records[ri].module if is_alloc else a.free_modules[i]
            ctx = va.ctx[i]
            events.append((resolve(a_ref(ri, ctx), None if ctx is None else final_a(ctx), None), is_alloc))
            event_ops.append(a.event_ops[i] + m * shifts[p])
            free_modules.append(None if is_alloc else rename_a(module))
            segments.append(_segment(starts_a, i))
        phase_starts = []
        for g, (ph, it, _) in enumerate(a.phase_starts):
            phase_starts.append((ph, it, next((k for k, s in enumerate(segments) if s >= g), len(events))))

        sized = []
        for call, c, record_at, i in calls:
            key = ("a", i) if c is None else ("b", i, c)
            if key not in call_event:
                raise NoSplice("a sized call has no place among the events")
            event_at, op_at = call_event[key]
            if c is None:
                made, rename = tuple(of_a[r] for r in call.made), rename_a
            else:
                made = tuple(of_b[(r, c)] if (r, c) in of_b else of_a[self.rec_ba[r]] for r in call.made)
                rename = rename_b(c)
            category, module, phase, iteration = call.context
            sized.append(replace(call, record_at=record_at, event_at=event_at, op_at=op_at, made=made,
                                 context=(category, rename(module), phase, iteration)))

        modules = [ModuleInfo(rename_a(mi.name), mi.type, mi.depth, mi.params, mi.output_shape)
                   for mi in a.modules[:self.modules_at]]
        for c in range(m):
            modules += [ModuleInfo(rename_b(c)(mi.name), mi.type, mi.depth, mi.params, mi.output_shape)
                        for mi in self.layer_modules]
        modules += [ModuleInfo(rename_a(mi.name), mi.type, mi.depth, mi.params, mi.output_shape)
                    for mi in a.modules[self.modules_at:]]

        def of_b_record(r: StorageRecord, c: int) -> StorageRecord:
            k = of_b.get((r.index, c))
            if k is None:
                k = of_a[self.rec_ba[r.index]]
            return records[k]

        tables = {}
        for table, ascending in (("param_records", True), ("grad_records", False), ("state_records", True),
                                 ("param_owner", True)):
            def value_a(v, table=table):
                if table == "param_owner":
                    return rename_a(v)
                return [records[of_a[r.index]] for r in v] if isinstance(v, list) else records[of_a[v.index]]

            def value_b(v, c, table=table):
                if table == "param_owner":
                    return rename_b(c)(v)
                return [of_b_record(r, c) for r in v] if isinstance(v, list) else of_b_record(v, c)

            tables[table] = self._table(table, m, ascending, rename_a, rename_b, value_a, value_b)

        layout = ()
        if a.shard_layout:  # each parameter's global shape and tensor-parallel dimension, in parameter order
            shapes = {**{rename_a(k): v for k, v in zip(a.param_records, a.shard_layout)},
                      **{rename_b(c)(k): v for c in range(m) for k, v in zip(b.param_records, b.shard_layout)}}
            layout = tuple(shapes[k] for k in tables["param_records"])
        flops = {k: a.flops[k] + m * (b.flops[k] - a.flops[k]) for k in a.flops}
        return replace(a, shard_layout=layout, records=records, events=events, event_ops=event_ops, free_modules=free_modules,
                       phase_starts=phase_starts, modules=modules, flops=flops, op_count=a.op_count + m * total_shift,
                       notes=tuple(about) + a.notes[self.about_a:], sized=tuple(sized), **tables)

    def _table(self, table, m, ascending, rename_a, rename_b, value_a, value_b) -> dict:
        """A's entries renamed, the inserted layer's (B's) copied, in the order B has them."""
        up = _renamer(self.path, lambda k: k + 1 if k >= self.j else k)
        ta, tb = getattr(self.a, table), getattr(self.b, table)
        keys_a, keys_b = list(ta), list(tb)
        runs = _runs(keys_b, _embed([up(k) for k in keys_a], keys_b, f"{table.replace('_', ' ')} entry"))
        out = {}
        for p in range(len(keys_a) + 1):
            run = runs.get(p, [])
            for c in (range(m) if ascending else range(m - 1, -1, -1)):
                for k in run:
                    out[rename_b(c)(k)] = value_b(tb[k], c)
            if p < len(keys_a):
                out[rename_a(keys_a[p])] = value_a(ta[keys_a[p]])
        return out


# ---- the splice, checked ------------------------------------------------------------------------------

def _records_key(t: Trace) -> list:
    return [(r.index, r.nbytes, r.birth, r.module, r.phase, r.iteration, r.op, r.saved, r.role, r.host, r.sums_into)
            for r in t.records]


def _table_key(v):
    if isinstance(v, list):
        return [r.index for r in v]
    return v.index if isinstance(v, StorageRecord) else v


def difference(x: Trace, y: Trace) -> str | None:
    """The first field in which two traces differ, or None: everything a report is built from."""
    checks = [
        ("target", lambda t: t.target.name),
        ("allocations", _records_key),
        # frees in one op are simultaneous: the report sorts them (report._canonical_events), and so does this
        ("events", lambda t: _canonical_events(t)),
        ("phases", lambda t: t.phase_starts),
        ("modules", lambda t: [(m.name, m.type, m.depth, m.output_shape, [tuple(p.shape) for p in m.params])
                               for m in t.modules]),
        ("parameters", lambda t: [(k, _table_key(v)) for k, v in t.param_records.items()]),
        ("gradients", lambda t: [(k, _table_key(v)) for k, v in t.grad_records.items()]),
        ("optimizer state", lambda t: [(k, _table_key(v)) for k, v in t.state_records.items()]),
        ("parameter owners", lambda t: list(t.param_owner.items())),
        ("assumptions", lambda t: t.assumptions),
        ("op count", lambda t: t.op_count),
        ("FLOPs", lambda t: t.flops),
        ("notes", lambda t: t.notes),
        ("shards", lambda t: (t.shard_layout, t.rank_keys)),
        ("sized allocations", lambda t: [(c.sizer, repr(c.arguments), c.persistent, c.record_at, c.event_at, c.op_at,
                                          c.context, c.made) for c in t.sized]),
    ]
    for what, key in checks:
        kx, ky = key(x), key(y)
        if kx != ky:
            if isinstance(kx, list) and isinstance(ky, list):
                k = next((k for k, (p, q) in enumerate(zip(kx, ky)) if p != q), min(len(kx), len(ky)))
                return f"{what} differ at {k} of {len(kx)} / {len(ky)}"
            return f"{what} differ"
    return None


def splice(model: torch.nn.Module, options: Options, stack: Stack, shown: torch.nn.Module | None = None,
           rank: int = 0) -> Trace:
    """The trace of ``model`` (its stack of ``stack.length`` layers) from traces of its first 2, 3 and 4;
    ``NoSplice`` where they do not line up or do not rebuild each other exactly, as soon as that shows.
    ``shown`` is the model as given (a compiled wrapper of ``model``), for the report's notes about it;
    ``rank``: the rank of a sharded step traced."""
    traced, abouts = [], []

    def at_depth(d: int) -> Trace:
        short = with_depth(model, stack.path, d)
        opts = _options_at(options, stack.path, d)
        t = trace(short, opts, rank)
        about = about_the_model(short, opts)
        if list(t.notes[:len(about)]) != about:
            raise NoSplice("the notes about the model are not first")
        if traced and t.assumptions != traced[0].assumptions:
            raise NoSplice("the step's data-dependent choices differ between depths")
        traced.append(t)
        abouts.append(about)
        return t

    d0 = DEPTHS[0]
    a, b = at_depth(d0), at_depth(d0 + 1)
    line = _Splice(a, b, stack.path, d0, len(abouts[0]), len(abouts[1]))
    for k in (1, 2):
        t = b if k == 1 else at_depth(d0 + 2)
        why = difference(line.at(k, abouts[k]), t)
        if why is not None:
            raise NoSplice(f"depth {d0 + k} spliced from {d0} and {d0 + 1}: {why}")
    return line.at(stack.length - d0, about_the_model(shown if shown is not None else model, options))
