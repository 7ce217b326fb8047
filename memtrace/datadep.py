"""Sizes and values that depend on tensor data, which fake tensors do not have.

Some ops size their output by the values in their input: ``nonzero``, boolean-mask indexing, ``unique``,
``masked_select``, ``repeat_interleave`` with tensor repeats, torchvision's ``nms`` (region proposals, anchor
matching, value-routed mixture-of-experts layers). FakeTensorMode refuses them. The tracer runs each such op
once more on a fake copy of its inputs under a ``ShapeEnv`` of its own, where PyTorch's fake kernel returns
outputs sized by fresh unbacked symbols with the range the op allows (``nonzero`` of n elements: 0 to n);
a ``SizePolicy`` picks a size for each symbol, and the outputs are made at those sizes. Every size stays a
number, so code that branches on sizes runs, and every choice is listed in the report.

The policy, ``data_dependent=`` of ``memtrace.report``:
- ``"upper"`` (the default): the largest size the op allows, so the prediction is an upper bound for that op;
- a fraction in (0, 1]: that share of the largest size, rounded up;
- a dict from ``"module"`` or ``"module:op"`` patterns (``fnmatch``, first match wins; ``"*"`` matches every
  module, ``""`` the root) to an int (the size), a fraction, ``"upper"``, or a list of ints (the sizes of
  successive calls at that place, repeated from the start when the trace makes more calls, e.g. in its
  second iteration);
- a callable(``Site``) returning one of those, or None for the default.

A value read from tensor data (``.item()``, ``.tolist()``, ``bool(tensor)``) is 0 / False unless a dict
pattern names op ``item`` ("router:item": [3, 5]); each such call takes its turn in a list, also the ones
whose value the trace knows (a ``torch.tensor`` of a Python number), as they do in a real run.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import linecache
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .values import BOUNDS, KnownValues

aten = torch.ops.aten

UPPER = "upper"
ITEM = "item"  # the op name of a value read from tensor data
ASSERTED = "asserted"  # how a value read by an assert statement is chosen: the assertion holds


@dataclass(frozen=True)
class Site:
    """One data-dependent size (or value) the trace needs, as a callable policy receives it."""

    module: str  # dotted module name, "" for the root; "(loss)", "(optimizer)" outside the model
    op: str  # the op's short name: "nonzero", "unique", "nms", ..., "item" for a value read from data
    bound: int | None  # the largest size the op allows; None where it allows any (or for a value)
    call: int  # how many sizes this (module, op) was given before, in this trace


@dataclass(frozen=True)
class Choice:
    """A size (or value) the trace chose, for the report's assumptions."""

    module: str
    op: str
    value: Any
    bound: int | None
    how: str  # "upper bound", "fraction 0.25", "given", "assumed"


def _place(modules: list[str]) -> str:
    def one(m: str) -> str:
        return "the root module" if not m else m if m.startswith("(") else f"module '{m}'"

    if len(modules) == 1:
        return one(modules[0])
    shown = ", ".join(repr(m) for m in modules[:3]) + (", ..." if len(modules) > 3 else "")
    return f"{len(modules)} modules ({shown})"


def describe_choices(choices: list[Choice], skip: Callable[[Choice], bool] = lambda c: False) -> list[str]:
    """One line per op and way of choosing, in the order first met: the modules it happened in (those
    where the same values were chosen share a line), the values and their bound, the calls."""
    places: dict[tuple, list[Choice]] = {}
    for c in choices:
        if not skip(c):
            places.setdefault((c.module, c.op, c.how), []).append(c)
    lines: dict[tuple, list] = {}  # (op, how, values shown, bound) -> [modules, calls]
    for (module, op, how), group in places.items():
        values = [c.value for c in group]
        low, high = min(values), max(values)
        bounds = [c.bound for c in group]
        key = (op, how, (low, high), None if None in bounds else max(bounds))
        line = lines.setdefault(key, [[], 0])
        line[0].append(module)
        line[1] += len(group)
    return [_line(op, how, values, bound, modules, calls) for (op, how, values, bound), (modules, calls) in lines.items()]


def _line(op: str, how: str, values: tuple, bound: int | None, modules: list[str], calls: int) -> str:
    where = _place(modules)
    times = f" ({calls} calls)" if calls > 1 else ""
    low, high = values
    if op == ITEM:
        shown = repr(low) if low == high else f"{low!r} to {high!r}"
        why = ("given" if how == "given" else
               "read by an assert, which holds in any run that gets past it" if how == ASSERTED else
               "assumed: fake tensors have no values; if it decides a size or "
               f"a branch, give it with data_dependent={{{_key(modules[0], ITEM)!r}: ...}}")
        return f"{where[0].upper() + where[1:]} read{'s' if len(modules) == 1 else ''} a value from tensor data " \
               f"(.item(), .tolist() or bool(tensor)){times}: {shown} ({why})"
    shown = f"{low:,}" if low == high else f"{low:,} to {high:,}"
    of = f" of at most {bound:,}" if bound is not None else ""
    return f"{op} in {where}: output size {shown}{of}{times} ({how})"


def op_name(func) -> str:
    """An op's short name, as ``data_dependent=`` patterns write it: "nonzero", "unique", "index", "nms"."""
    packet = getattr(func, "overloadpacket", None)
    name = (getattr(packet, "__name__", None) or str(func)).split("::")[-1].split(".")[0].lstrip("_")
    return "unique" if name in ("unique2", "unique") else name


class SizePolicy:
    """``data_dependent=``, checked once: how each data-dependent size and value is chosen."""

    def __init__(self, spec: Any = None):
        self.spec = UPPER if spec is None else spec
        self.rules: list[tuple[str, str | None, Any]] = []  # (module pattern, op or None, value)
        self.used: set[int] = set()  # indices of the rules that matched a site
        if isinstance(self.spec, str):
            if self.spec != UPPER:
                raise ValueError(f"data_dependent={spec!r} is unknown; valid: 'upper', a fraction in (0, 1], a dict "
                                 "of 'module[:op]' patterns to sizes, or a callable(site)")
        elif isinstance(self.spec, Mapping):
            for key, value in self.spec.items():
                if not isinstance(key, str):
                    raise TypeError(f"data_dependent= keys are 'module' or 'module:op' patterns, got {key!r}")
                module, _, op = key.rpartition(":") if ":" in key else (key, "", "")
                _check_value(value, f"data_dependent[{key!r}]", item=op == ITEM)
                self.rules.append((module, op or None, value))
        elif not callable(self.spec):
            _check_value(self.spec, "data_dependent")
            if not isinstance(self.spec, float):
                raise ValueError(f"data_dependent={spec!r}: a single number is a fraction of the largest size, in "
                                 "(0, 1]; give sizes per module in a dict")
        self.calls: dict[tuple[str, str], int] = {}
        self.choices: list[Choice] = []

    def _given(self, site: Site) -> tuple[Any, int | None]:
        """The user's value for ``site`` and the index of the rule that gave it (None: the default). Values
        read from tensor data come only from rules that name op ``item``; a fraction or a callable chooses
        sizes alone."""
        if site.op != ITEM and callable(self.spec) and not isinstance(self.spec, (Mapping, str)):
            value = self.spec(site)
            if value is not None:
                _check_value(value, f"data_dependent({site})")
            return value, None
        if isinstance(self.spec, float):
            return (self.spec if site.op != ITEM else None), None
        for k, (module, op, value) in enumerate(self.rules):
            if fnmatch.fnmatchcase(site.module, module) and op == (site.op if site.op == ITEM or op else None):
                return value, k
        return None, None

    def choose(self, module: str, op: str, bound: int | None, default: Any = None, how: str = "assumed") -> Any:
        """The size (or, for ``item``, the value) at this site; records the choice. ``how``: what a value
        not given is, "assumed" or ``ASSERTED``."""
        call = self.calls.get((module, op), 0)
        self.calls[(module, op)] = call + 1
        site = Site(module, op, bound, call)
        value, rule = self._given(site)
        if rule is not None:
            self.used.add(rule)
        if isinstance(value, list):
            value = value[call % len(value)]
        if op == ITEM:
            how = how if value is None else "given"
            chosen = default if value is None else value
        elif value is None or value == UPPER:
            if bound is None:
                raise DataDependentSizeError(
                    f"{op} sizes its output by tensor values and allows any size, so there is no upper bound to "
                    f"assume; give its size with data_dependent={{{_key(module, op)!r}: N}}")
            chosen, how = bound, "upper bound"
        elif isinstance(value, float):
            if bound is None:
                raise DataDependentSizeError(
                    f"{op} sizes its output by tensor values and allows any size, so a fraction of its largest size "
                    f"means nothing; give its size with data_dependent={{{_key(module, op)!r}: N}}")
            chosen, how = math.ceil(value * bound), f"fraction {value:g}"
        else:
            if bound is not None and value > bound:
                raise DataDependentSizeError(f"data_dependent= gives {op} in {module or 'the root module'} size "
                                             f"{value}, over the largest it allows, {bound}")
            chosen, how = int(value), "given"
        self.choices.append(Choice(module, op, chosen, bound, how))
        return chosen

    def known(self, module: str, op: str) -> None:
        """A call whose value the trace has (a constant): it takes its turn in a list of given values, as the
        same call of a real run does, and makes no choice."""
        call = self.calls.get((module, op), 0)
        self.calls[(module, op)] = call + 1
        if self.rules:
            _, rule = self._given(Site(module, op, None, call))
            if rule is not None:
                self.used.add(rule)

    def unused(self) -> list[str]:
        """The dict's patterns that matched no size or value: most likely misspelt."""
        return [f"{m}:{o}" if o else m for k, (m, o, _) in enumerate(self.rules) if k not in self.used]


def _read_by_an_assert() -> bool:
    """Whether the value being read is read by an ``assert`` statement: in the innermost frame outside
    torch and memtrace, or in one of torch's on the way there (``torch._assert``)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        ours = filename.startswith(_MEMTRACE_DIR)
        if not ours and frame.f_lineno in _assert_lines(filename):
            return True
        if not ours and not filename.startswith(_TORCH_DIR):
            return False
        frame = frame.f_back
    return False


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_MEMTRACE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@functools.lru_cache(maxsize=256)
def _assert_lines(filename: str) -> frozenset:
    """The line numbers that ``assert`` statements span in a source file."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError):
        return frozenset()
    return frozenset(line for node in ast.walk(tree) if isinstance(node, ast.Assert)
                     for line in range(node.lineno, (node.end_lineno or node.lineno) + 1))


class DataDependentSizeError(RuntimeError):
    """A size that depends on tensor values could not be chosen."""


def _key(module: str, op: str) -> str:
    return f"{module}:{op}"


_VALID = "valid: 'upper', a size (int), a fraction in (0, 1], or a list of sizes"


def _check_value(value: Any, name: str, item: bool = False) -> None:
    if item:  # values read from tensor data: any number or bool, or a list of them
        if isinstance(value, (int, float, bool)) or (
                isinstance(value, list) and value and all(isinstance(v, (int, float, bool)) for v in value)):
            return
        raise TypeError(f"{name}={value!r}; a value read from tensor data is a number or a bool, or a list of them")
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}; {_VALID}")
    if value == UPPER:
        return
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}={value!r} must be a size >= 0")
        return
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"{name}={value!r}: a fraction of the largest size must be in (0, 1]")
        return
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return
    raise TypeError(f"{name}={value!r}; {_VALID}")


def is_data_dependent(func, exc: BaseException) -> bool:
    """Whether ``exc`` from ``func`` on fake tensors means its output size depends on values."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    if isinstance(exc, DynamicOutputShapeException):
        return True
    tags = getattr(func, "tags", ())
    # a custom op's fake kernel asks for a dynamic size with an assertion that a ShapeEnv is present
    return torch.Tag.dynamic_output_shape in tags or (isinstance(exc, AssertionError)
                                                      and getattr(func, "namespace", "aten") not in ("aten", "prims"))


def _signature(func, args, kwargs) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    return (func, str(spec), tuple((tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor)
                                   else repr(a) for a in leaves))


def _symbolic_outputs(func, args, kwargs):
    """Run ``func`` on fake copies of its inputs under a ShapeEnv of its own: its outputs (sized by unbacked
    symbols where the sizes depend on values) and each symbol's upper bound (None: unbounded)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    side = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)

    def copy(a):
        if not isinstance(a, torch.Tensor):
            return a
        meta = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        return side.from_tensor(meta, static_shapes=True)

    with side:
        out = func(*tree_map(copy, args), **tree_map(copy, kwargs))
    flat, spec = tree_flatten(out)
    symbols = []
    for t in flat:
        if isinstance(t, torch.Tensor):
            for n in (*t.shape, *t.stride(), t.storage_offset()):
                if isinstance(n, torch.SymInt):
                    symbols += [x for x in n.node.expr.free_symbols if x not in symbols]
    bounds = []
    for sym in symbols:
        upper = env.var_to_range[sym].upper
        bounds.append((sym, None if str(upper) in ("int_oo", "oo") else int(upper)))
    return flat, spec, bounds


def run_with_sizes(func, args, kwargs, choose: Callable[[int | None], int], cache: dict | None = None,
                   values: KnownValues | None = None):
    """``func``'s outputs on the tracer's fake tensors, with every size that depends on values replaced by
    ``choose(its upper bound)``: the fake kernel's bound, or a tighter one from the input's value range.
    ``cache`` keeps each signature's symbolic run, which is the slow part: a loop over data-dependent sizes
    calls the same op on the same shapes many times."""
    key = _signature(func, args, kwargs) if cache is not None else None
    if key is not None and key in cache:
        flat, spec, bounds = cache[key]
    else:
        flat, spec, bounds = _symbolic_outputs(func, args, kwargs)
        if key is not None:
            cache[key] = flat, spec, bounds
    bound_of = BOUNDS.get(func.name() if hasattr(func, "name") else "")
    tighter = bound_of(*args, **kwargs, values=values or KnownValues()) if bound_of is not None else None
    sizes = {sym: choose(bound if tighter is None else tighter if bound is None else min(bound, tighter))
             for sym, bound in bounds}
    device = next((a.device for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)), "cpu")

    def concrete(n):
        return int(n.node.expr.xreplace(sizes)) if isinstance(n, torch.SymInt) else int(n)

    made = []
    for t in flat:
        if isinstance(t, torch.Tensor):
            made.append(torch.empty_strided([concrete(n) for n in t.shape], [concrete(n) for n in t.stride()],
                                            dtype=t.dtype, device=device))
        else:
            made.append(concrete(t) if isinstance(t, torch.SymInt) else t)
    return tree_unflatten(made, spec)


class DataDependence:
    """What the tracer does where fake tensors lack the values an op needs: it reads a value (``.item()``)
    or sizes its output by values. Keeps the policy and its choices, the ops' symbolic runs and the value
    ranges of integer tensors (``values.after`` is told of every op)."""

    def __init__(self, sizes: SizePolicy):
        self.sizes = sizes
        self.values = KnownValues()
        self._symbolic_runs: dict = {}  # data-dependent ops' symbolic outputs, by signature
        self.assumed_counts = 0  # integer values assumed 0 and not yet taken up by a split (see split)
        self._splits: dict[tuple[int, int], list[int]] = {}  # (pieces, size split) -> the last sizes chosen

    def value_read(self, args, module: str):
        """A value read from tensor data (``.item()``, ``.tolist()``, ``bool(tensor)``): the one given with
        ``data_dependent=``, else True when an ``assert`` reads it (an assertion on data holds in any run
        that gets past it), else 0 / False."""
        value: object = 0
        if args and isinstance(args[0], torch.Tensor):
            dtype = args[0].dtype
            value = False if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        if value is False and _read_by_an_assert():
            return self.sizes.choose(module, ITEM, None, True, how=ASSERTED)
        chosen = self.sizes.choose(module, ITEM, None, value)
        if self.sizes.choices[-1].how == "assumed" and isinstance(value, int) and not isinstance(value, bool):
            self.assumed_counts += 1
        return chosen

    def value_known(self, module: str) -> None:
        """A value read from a tensor whose value the trace holds: it takes its turn in a list of given ones."""
        self.sizes.known(module, ITEM)

    def sized(self, func, args, kwargs, exc: Exception, module: str):
        """The outputs of an op whose size depends on tensor values, at the sizes the policy chooses."""
        name = op_name(func)
        try:
            return run_with_sizes(func, args, kwargs, lambda bound: self.sizes.choose(module, name, bound),
                                  self._symbolic_runs, self.values)
        except DataDependentSizeError:
            raise
        except Exception:
            schema = getattr(func, "_schema", None)
            first = schema.arguments[0] if schema is not None and schema.arguments else None
            if first is not None and first.alias_info is not None and first.alias_info.is_write:
                return args[0]  # in place (x[mask] = v): the output is the input, whatever the values
            raise DataDependentSizeError(
                f"{name} sizes its output by tensor values, and this PyTorch's fake kernel for it cannot size it "
                f"even symbolically ({type(exc).__name__}), so no size can be chosen") from exc

    def splits_assumed_counts(self, func, args) -> bool:
        """``x.split(counts.tolist())``: a mixture-of-experts layer splits its tokens by the counts its router
        made, read from tensor data. Assumed 0, they sum to nothing, and PyTorch refuses the split; the
        split is then the op that sizes its pieces by values."""
        if func is not aten.split_with_sizes.default or len(args) < 2 or not isinstance(args[1], (list, tuple)):
            return False
        sizes, dim = args[1], args[2] if len(args) > 2 else 0
        if not sizes or any(s != 0 for s in sizes):
            return False
        # new counts, or the same counts splitting a tensor of the same size again (input and output
        # projections of the same experts)
        return len(sizes) <= self.assumed_counts or (len(sizes), args[0].shape[dim]) in self._splits

    def split(self, func, args, kwargs, module: str):
        """The split of ``splits_assumed_counts``, its pieces sized by the policy: by default the first piece
        takes the whole dim (the largest a piece can be) and the others none; a fraction gives each piece
        that share of the dim while it lasts; a list gives the sizes."""
        x, sizes = args[0], args[1]
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        total, left, chosen = x.shape[dim], x.shape[dim], []
        if len(sizes) > self.assumed_counts:  # the counts split before
            return func(x, self._splits[(len(sizes), total)], dim)
        self.assumed_counts -= len(sizes)
        wanted = [self.sizes.choose(module, "split", total) for _ in sizes[:-1]]
        how = self.sizes.choices[-1].how if wanted else "upper bound"
        if how == "given" and sum(wanted) > total:
            raise DataDependentSizeError(f"data_dependent= gives split in {module or 'the root module'} sizes "
                                         f"{wanted} over the {total} it splits")
        for piece in wanted:  # each while the dim lasts, the last piece what is left
            chosen.append(min(piece, left))
            left -= chosen[-1]
        chosen.append(left)
        # the choices as made: the pieces, not what was asked of each
        del self.sizes.choices[len(self.sizes.choices) - len(wanted):]
        self.sizes.choices += [Choice(module, "split", piece, total, how) for piece in chosen]
        self._splits[(len(sizes), total)] = chosen
        return func(x, chosen, dim)


# ---- the sizes a real run produces ------------------------------------------------------------------------
class SizeRecorder(TorchDispatchMode):
    """On a real run, records the size of every data-dependent op, keyed as ``data_dependent=`` takes them
    ("module:op" -> sizes in call order), so that a prediction can be made at the sizes that run produced.
    Modules are named by forward hooks, as the tracer names them; ops outside every module are under
    ``label()``, the step's phase ("(loss)", "(optimizer)").

    Values read with ``.item()`` are not recorded: real kernels read some that fake kernels do not
    (``one_hot`` checks its input's range on the CPU), so their order does not line up with a trace's."""

    def __init__(self, model: torch.nn.Module, label: Callable[[], str]):
        super().__init__()
        self.model, self.label = model, label
        self.sizes: dict[str, list] = {}
        self._stack: list[str] = []
        self._cache: dict = {}
        self._handles: list = []

    def __enter__(self):
        def enter(module, args, name):
            self._stack.append(name)

        def leave(module, args, out):
            self._stack.pop()

        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: enter(m, a, _n)))
            self._handles.append(module.register_forward_hook(leave))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return super().__exit__(*exc)

    def _record(self, op: str, value) -> None:
        module = self._stack[-1] if self._stack else self.label()
        self.sizes.setdefault(f"{module}:{op}", []).append(value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _sizes_by_values(func, args):
            key = _signature(func, args, kwargs)
            if key not in self._cache:
                self._cache[key] = _symbolic_outputs(func, args, kwargs)
            flat, _, bounds = self._cache[key]
            real = tree_flatten(out)[0]
            for sym, _ in bounds:
                self._record(op_name(func), _size_of(sym, flat, real))
        return out


def _sizes_by_values(func, args) -> bool:
    """Whether the tracer, on fake tensors, has to choose a size for this op."""
    if torch.Tag.dynamic_output_shape in getattr(func, "tags", ()):
        return True
    if getattr(func, "namespace", "aten") != "aten" and func.name() in BOUNDS:  # torchvision's nms
        return True
    if func is aten.index.Tensor:  # a boolean mask selects a number of elements that depends on it
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


def _size_of(sym, symbolic: list, real: list) -> int:
    """The real size that symbol ``sym`` stands for in the symbolic outputs."""
    for s, r in zip(symbolic, real):
        if isinstance(s, torch.Tensor):
            for n, m in zip(s.shape, r.shape):
                if isinstance(n, torch.SymInt) and n.node.expr == sym:
                    return int(m)
    raise AssertionError(f"size symbol {sym} is not a dimension of the outputs")
