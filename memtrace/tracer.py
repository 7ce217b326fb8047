"""Records every storage the training step allocates and frees, on fake tensors.

A ``TorchDispatchMode`` sits above ``FakeTensorMode``: each op's outputs are checked for storages it has
not seen, and each new storage gets a weakref whose callback records the free when the last reference
(a Python variable, an autograd node's saved tensor, an optimizer state) goes away. Views share their
base's storage and in-place ops return an existing one, so neither is counted twice.

Known limitations:
- Temporaries that a kernel allocates and frees inside one op (oneDNN scratch, cuDNN workspaces) are not
  seen; device rules model the ones that matter.
- Data-dependent scalars (``.item()``, ``bool(tensor)``) have no value on fake tensors; the tracer answers
  0 / False (or the value given with ``data_dependent=``) and lists each such place in the report's
  assumptions. Outputs sized by tensor values (``nonzero``, masks) get the sizes ``datadep.SizePolicy``
  chooses, listed there too.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .datadep import DataDependence, SizePolicy, is_data_dependent
from .options import Category, Phase

try:  # the exception FakeTensorMode raises for .item() on data it does not have
    from torch._subclasses.fake_tensor import DataDependentOutputException
except ImportError:  # pragma: no cover
    DataDependentOutputException = RuntimeError

_ACCUMULATE_GRAD = "torch::autograd::AccumulateGrad"
_ADD = torch.ops.aten.add.Tensor
_DEVICE = torch.ops.prim.device.default
_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


@dataclass
class StorageRecord:
    """One allocation, filled in while tracing (mutable), frozen into the report afterwards."""

    index: int
    nbytes: int
    birth: Category | None  # set for parameters, buffers and inputs at creation
    module: str
    phase: Phase
    iteration: int
    op: object  # the OpOverload that allocated it
    alloc_event: int
    free_event: int | None = None
    saved: bool = False  # saved for backward by an autograd node
    role: Category | None = None  # gradient or optimizer state, learnt after birth
    host: bool = False  # lives in host memory on the target device (e.g. Adam's step counter on CUDA)
    sums_into: int | None = None  # record of the engine's buffered gradient this sum could have reused
    # an optimizer temporary: the record of the input it was computed from (a foreach op's output: its input
    # at the same place in the list); depth.splice reads it to know whose layer a temporary belongs to
    follows: int | None = None

    @property
    def category(self) -> Category:
        if self.birth is not None:
            return self.birth
        if self.role is not None:
            return self.role
        return Category.ACTIVATION if self.saved else Category.TEMPORARY


@dataclass
class SizedCall:
    """A rule's allocations sized by ``sizer(target, *arguments)`` (``StorageTracker.allocate_sized``): where
    in the trace they were made, and the records they made there. Scratch is freed, in reverse, right after
    it is allocated; a persistent workspace is kept."""

    sizer: object
    arguments: tuple
    persistent: bool
    record_at: int  # records made before the call
    event_at: int  # events before the call
    op_at: int  # the op count the call's events carry
    context: tuple  # (category, module, phase, iteration) of the records it makes
    made: tuple = ()  # record indices


@dataclass
class ModuleCall:
    """Where the tracer is: which module runs, in which phase and iteration."""

    phase: Phase = Phase.SETUP
    iteration: int = 0
    birth: Category | None = None
    label: str = "(setup)"


class SavedTensorModifiedError(RuntimeError):
    """A tensor saved for backward was modified in place before backward used it; PyTorch refuses such a
    step with the same message."""


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (its shard on this rank), which holds its storage; any other tensor itself."""
    return t._local_tensor if type(t).__name__ == "DTensor" else t


def _dense(t: torch.Tensor) -> bool:
    """``is_non_overlapping_and_dense``: the strides, sorted, tile the elements without gaps."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


class StorageTracker(TorchDispatchMode):
    def __init__(self, target, sizes: SizePolicy | None = None):
        super().__init__()
        self.target = target
        self.data = DataDependence(sizes or SizePolicy())  # sizes and values that depend on tensor data
        self.dispatch_rules = target.rules.ops
        self.records: list[StorageRecord] = []
        self.sized: list[SizedCall] = []  # allocate_sized
        # the allocation order: (record index, True) for an allocation, (record index, False) for its free
        self.events: list[tuple[int, bool]] = []
        self.event_ops: list[int] = []
        self.free_modules: list[str | None] = []  # per event: for a free, the module running (None: an allocation)
        self.op_count = 0
        self.recording = True
        self.notes: list[str] = []  # what a rule says the prediction leaves out, once each
        self.where = ModuleCall()
        self.module_stack: list[tuple[str, tuple]] = []  # (name, (type name, input shapes))
        self.last_op = None  # the op running when something fails, for the error message
        self.graph = None  # a graph.Recorder told of every op (Report.graph() traces again with one)
        self.flops = None  # a flops.FlopCounter, told of every op
        # storage key -> (weakref whose callback records the free, records of that storage, or None for
        # a storage the device keeps in host memory)
        self._live: dict[int, tuple[weakref.ref, list[StorageRecord] | None]] = {}
        # backward attribution: autograd sequence numbers at which the innermost module changed
        self._seq_marks: list[int] = []
        self._seq_names: list[str] = []
        self.param_module: dict[int, str] = {}
        self._watched: set[int] = set()  # sequence numbers of backward nodes given a post-hook
        self._persistent: set = set()
        self._accumulating = None  # sequence number of the node whose outputs the engine is summing
        # tensor subclasses that wrap a local tensor (DTensor): their ops are left to the subclass, whose
        # ops on the local tensors come back here, so only the local storages are accounted
        self.wrapper_types: tuple[type, ...] = ()
        self._hidden = False  # ops that are not the step's (a library's shape inference on fake tensors)

    # ---- ops -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE or self._hidden:  # the autograd engine asks every tensor's device; nothing to account
            return func(*args, **(kwargs or {}))
        if self.wrapper_types and any(issubclass(t, self.wrapper_types) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        self.last_op = func
        if self.where.phase is Phase.BACKWARD:
            self.watch_backward_node()
        rule = self.dispatch_rules.get(func)
        try:
            out = rule(self, func, args, kwargs) if rule is not None else func(*args, **kwargs)
        except DataDependentOutputException:
            out = self.data.value_read(args, self.current_module())
        except Exception as exc:
            if is_data_dependent(func, exc):
                out = self.data.sized(func, args, kwargs, exc, self.current_module())
            elif self.data.splits_assumed_counts(func, args):
                out = self.data.split(func, args, kwargs, self.current_module())
            else:
                raise
        else:
            if func is _LOCAL_SCALAR:  # a value fake tensors hold (a torch.tensor of a Python number)
                self.data.value_known(self.current_module())
        self.data.values.after(func, args, kwargs, out)
        self.op_count += 1
        if self.flops is not None and self.where.iteration == 0:  # later iterations repeat the first's FLOPs
            self.flops.count(func, args, kwargs, out, self.where.phase)
        if self.recording:
            self.record_outputs(out, func)
            if isinstance(out, list) and out:
                self._follow_list(func, args, out)
            elif self.where.phase is Phase.OPTIMIZER:
                self._follow(func, args, out)
            if (func is _ADD and isinstance(out, torch.Tensor) and self._accumulating is not None
                    and self.where.phase is Phase.BACKWARD):
                self._note_accumulation(out, args)
        if self.graph is not None:
            self.graph.record(func, args, kwargs, out, self.op_count, self.current_module(), self.where,
                              len(self.events))
        return out

    def record_outputs(self, out, func) -> None:
        """Accounts the storages of an op's outputs. Called after every op; a rule calls it itself where
        the op's outputs exist before the scratch the rule adds (seeing a storage twice is a no-op)."""
        if not self.recording:
            return
        if isinstance(out, torch.Tensor):
            self._see(out, func)
        else:
            for t in (out if isinstance(out, (tuple, list)) else tree_flatten(out)[0]):
                if isinstance(t, torch.Tensor):
                    self._see(t, func)

    def _follow_list(self, func, args, out: list) -> None:
        """Each output of a foreach op (one per tensor of its input list) made here follows its input: the
        optimizer's temporaries belong to the parameter whose state or gradient they were computed from."""
        if not func.__name__.startswith("_foreach_"):
            return
        inputs = next((a for a in args if isinstance(a, (list, tuple)) and len(a) == len(out)), None)
        if inputs is None:
            return
        for t, source in zip(out, inputs):
            if isinstance(t, torch.Tensor) and isinstance(source, torch.Tensor):
                rec, followed = self.record_of(t), self.record_of(source)
                if rec is not None and followed is not None and rec.op is func and rec.follows is None \
                        and rec is not followed:
                    rec.follows = followed.index

    def _follow(self, func, args, out) -> None:
        """An optimizer op's new outputs follow its first tensor input (a for-loop optimizer works one
        parameter at a time: its temporaries belong to that parameter's state or gradient)."""
        source = next((a for a in args if isinstance(a, torch.Tensor)), None)
        followed = None if source is None else self.record_of(source)
        if followed is None:
            return
        for t in (out,) if isinstance(out, torch.Tensor) else out if isinstance(out, tuple) else ():
            if isinstance(t, torch.Tensor):
                rec = self.record_of(t)
                if rec is not None and rec.op is func and rec.follows is None and rec is not followed:
                    rec.follows = followed.index

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    @contextlib.contextmanager
    def hidden(self):
        """Ops run inside the block are not the step's: neither counted nor accounted."""
        hidden, self._hidden = self._hidden, True
        try:
            yield
        finally:
            self._hidden = hidden

    def adopt(self, t: torch.Tensor, category: Category, label: str = "(setup)") -> None:
        """Accounts a tensor made while nothing was recorded (a parameter sharded on the fake copy), or made
        outside any op (``label`` says by what), as if it were allocated now, as ``category``."""
        birth, self.where.birth = self.where.birth, category
        try:
            self._see(local(t), label)
        finally:
            self.where.birth = birth

    def storage_resized(self, st, before: int, after: int, role: Category | None = None) -> None:
        """A storage resized in place (``UntypedStorage.resize_``): growth is a new allocation; resizing to
        zero frees what it held, and a later growth is a new allocation again. ``role``: what the storage
        holds, for every allocation it had."""
        if not self.recording or before == after:
            return
        key = st._cdata
        entry = self._live.get(key)
        if entry is not None and entry[1] is None:
            return
        if after > before:
            if entry is None:
                self._live[key] = entry = (weakref.ref(st, self._freed_callback(key)), [])
            self._alloc(entry[1], after - before, "resize_")
            if role is not None:
                for rec in entry[1]:
                    rec.role = rec.role or role
        elif entry is not None and after == 0:
            for rec in entry[1]:
                if role is not None and rec.birth is None:
                    rec.role = rec.role or role
                self._free(rec)
            entry[1].clear()

    def in_host_memory(self, t: torch.Tensor) -> None:
        """Marks an op's output as one the device keeps in host memory (a CPU tensor a CUDA kernel
        returns): its storage is never accounted."""
        st = t.untyped_storage()
        key = st._cdata
        if key not in self._live:
            self._live[key] = (weakref.ref(st, self._freed_callback(key)), None)

    # ---- gradient accumulation -----------------------------------------------------------------
    # When two gradients meet at one input, the autograd engine sums them in its InputBuffer as
    # ``old_var + var``, in place on ``old_var`` when it is dense, not a view, and nothing else references
    # it or its storage (torch/csrc/autograd/input_buffer.cpp, accumulate and can_accumulate_inplace).
    # Tensor subclasses such as fake tensors are never summed in place, so the tracer sees an out-of-place
    # add that a real run may not do. It marks such adds here (the node's post-hook has run: the engine
    # is distributing the node's outputs) and ``fuse_accumulations`` undoes those that were in place.
    def watch_backward_node(self) -> None:
        node = torch._C._current_autograd_node()
        if node is None:
            return
        seq = node._sequence_nr()  # nodes cannot be weakly referenced, and a strong one keeps the graph
        if seq not in self._watched and node.name() != _ACCUMULATE_GRAD:
            self._watched.add(seq)
            node.register_hook(lambda grad_inputs, grad_outputs, _seq=seq: self._set_accumulating(_seq))

    def _set_accumulating(self, seq: int) -> None:
        self._accumulating = seq

    def _note_accumulation(self, out: torch.Tensor, args) -> None:
        node = torch._C._current_autograd_node()
        rec = self.record_of(out)
        if node is None or node._sequence_nr() != self._accumulating or rec is None:
            return
        if rec.alloc_event != len(self.events) - 1:  # not a fresh allocation of this op
            return
        old_var = args[0]
        if not isinstance(old_var, torch.Tensor) or old_var._is_view() or not _dense(old_var):
            return  # a view shares its storage with its base: the engine sums out of place
        operand = self.record_of(old_var)
        if operand is not None:
            rec.sums_into = operand.index

    def _see(self, t: torch.Tensor, func) -> None:
        st = t.untyped_storage()
        key = st._cdata
        entry = self._live.get(key)
        if entry is not None and entry[1] is None:  # in host memory
            return
        if entry is None:
            self._live[key] = entry = (weakref.ref(st, self._freed_callback(key)), [])
            self._alloc(entry[1], st.nbytes(), func)
            return
        grown = st.nbytes() - sum(r.nbytes for r in entry[1])
        if grown > 0:  # resize_ grew a storage in place: the growth is a new allocation
            self._alloc(entry[1], grown, func)

    def _alloc(self, group: list[StorageRecord], nbytes: int, func, birth: Category | None = None) -> None:
        where = self.where
        rec = StorageRecord(
            index=len(self.records), nbytes=nbytes, birth=birth or where.birth, module=self.current_module(),
            phase=where.phase, iteration=where.iteration, op=func, alloc_event=len(self.events),
        )
        self.records.append(rec)
        self.events.append((rec.index, True))
        self.event_ops.append(self.op_count)
        self.free_modules.append(None)
        group.append(rec)

    def allocate_persistent(self, key, nbytes: int, category: Category, label: str) -> None:
        """An allocation no tensor shows (a library's workspace), made once per key and kept to the end."""
        if key in self._persistent:
            return
        self._persistent.add(key)
        self._alloc([], nbytes, label, birth=category)

    def allocate_scratch(self, nbytes: int, label: str, category: Category = Category.TEMPORARY):
        """An allocation no tensor shows that an op makes and frees inside its kernel (a library's scratch
        buffer), as a temporary of the running op unless ``category`` says otherwise; returns the function
        that frees it."""
        group: list[StorageRecord] = []
        self._alloc(group, nbytes, label, birth=category)

        return lambda: self._free(group[0])

    def allocate_sized(self, sizer, arguments: tuple, category: Category = Category.TEMPORARY,
                       persistent=None) -> list:
        """The allocations ``sizer(target, *arguments)`` lists, as (label, bytes) pairs in the order the
        library makes them: scratch that the op frees (``allocate_scratch``; their frees are returned), or
        with ``persistent=key`` a workspace made once per key and kept. The call is kept (``self.sized``)
        with the records it made, so that a replay at another batch size or for another GPU of the same
        kind can size them again from the same function (``sweep.Line``): a rule's scratch is rarely affine
        in the batch (a reduction splits across more blocks as its input grows) and depends on the GPU."""
        if persistent is not None:
            if persistent in self._persistent:
                return []
            self._persistent.add(persistent)
        call = SizedCall(sizer, arguments, persistent is not None, len(self.records), len(self.events), self.op_count,
                         (category, self.current_module(), self.where.phase, self.where.iteration))
        frees = []
        for label, nbytes in sizer(self.target, *arguments):
            if persistent is None:
                frees.append(self.allocate_scratch(nbytes, label, category))
            else:
                self._alloc([], nbytes, label, birth=category)
            call.made += (len(self.records) - 1,)
        self.sized.append(call)
        return frees

    def _free(self, rec: StorageRecord) -> None:
        rec.free_event = len(self.events)
        self.events.append((rec.index, False))
        self.event_ops.append(self.op_count)
        self.free_modules.append(self.current_module())

    def _freed_callback(self, key):
        def freed(_ref):
            _, group = self._live.pop(key, (None, ()))
            if not self.recording or group is None:
                return
            for rec in group:
                self._free(rec)
        return freed

    @property
    def assumptions(self) -> list:
        """The data-dependent sizes and values chosen so far (``datadep.Choice``)."""
        return self.data.sizes.choices

    # ---- where we are ------------------------------------------------------------------------
    def record_of(self, t: torch.Tensor) -> StorageRecord | None:
        entry = self._live.get(local(t).untyped_storage()._cdata)
        return entry[1][0] if entry and entry[1] else None

    def current_module(self) -> str:
        where = self.where
        if where.phase is Phase.BACKWARD:
            return self._backward_module()
        if self.module_stack:
            return self.module_stack[-1][0]
        return where.label

    def _backward_module(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return "(backward)"
        if node.name() == _ACCUMULATE_GRAD:
            return self.param_module.get(id(node.variable), "(backward)")
        i = bisect.bisect_right(self._seq_marks, node._sequence_nr()) - 1
        return self._seq_names[i] if i >= 0 else "(loss)"

    def enter_module(self, name: str, about: tuple) -> None:
        self.module_stack.append((name, about))
        self._mark_seq(name)

    def exit_module(self) -> None:
        if self.module_stack:
            self.module_stack.pop()
        self._mark_seq(self.module_stack[-1][0] if self.module_stack else "(loss)")

    def _mark_seq(self, name: str) -> None:
        seq = torch.autograd._get_sequence_nr()
        if self._seq_marks and self._seq_marks[-1] == seq:
            self._seq_names[-1] = name
        else:
            self._seq_marks.append(seq)
            self._seq_names.append(name)

    def mark_saved(self, t: torch.Tensor) -> None:
        rec = self.record_of(t)
        if rec is not None:
            rec.saved = True

    def saved_tensors_hooks(self):
        """The saved-tensor hooks of the traced step: each tensor an autograd node saves is an activation.

        Autograd checks, when a node unpacks a saved tensor, that nothing modified it in place since it was
        saved, but not for tensors that hooks pack (torch/csrc/autograd/saved_variable.cpp): these hooks
        make the same check, so a step that PyTorch would reject is rejected here too, with the module that
        saved the tensor named."""
        def pack(t: torch.Tensor):
            self.mark_saved(t)
            grad_fn = t.grad_fn
            return t, t._version, self.current_module(), grad_fn.name() if grad_fn is not None else None

        def unpack(packed):
            t, version, module, made_by = packed
            if t._version != version:
                node = torch._C._current_autograd_node()
                output = f", which is output {t.output_nr} of {made_by}," if made_by else ""
                raise SavedTensorModifiedError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: [{t.type()} {list(t.shape)}]{output} is at version {t._version}; expected "
                    f"version {version} instead. It was saved in forward by "
                    f"{'the root module' if not module else module if module.startswith('(') else repr(module)}"
                    f"{' for ' + node.name() if node is not None else ''}, and PyTorch raises this error in its "
                    "backward too")
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    @contextlib.contextmanager
    def generator_states_seen(self):
        """Activation checkpointing (``torch.utils.checkpoint``, preserve_rng_state) keeps the CPU
        generator's state, ``torch.get_rng_state()``, a tensor made outside any op, until the checkpointed
        region is recomputed. For a CPU run it is memory of the device, accounted as it is held; on a GPU
        it is host memory."""
        if self.target.name != "cpu":
            yield
            return
        own = torch.get_rng_state

        def get_rng_state() -> torch.Tensor:
            state = own()
            self.adopt(state, Category.ACTIVATION, "torch.get_rng_state")
            return state

        torch.get_rng_state = get_rng_state
        try:
            yield
        finally:
            torch.get_rng_state = own

    def mark_role(self, t: torch.Tensor, role: Category, host: bool = False) -> None:
        rec = self.record_of(t)
        if rec is not None and rec.birth is None:
            rec.role = role
            rec.host = rec.host or host

    def stop(self) -> None:
        self.recording = False

    def fuse_accumulations(self) -> list[int]:
        """Rewrite each engine-side out-of-place gradient sum as the in-place sum a real run does.

        A marked sum (its buffered operand dense and not a view) was in place exactly when that operand
        was released right after the add, before any other op ran: it had no other reference. The sum
        then takes over the operand's allocation: its record starts where the operand's did and the
        operand's record disappears. Where three or more gradients meet, the engine sums each into the
        previous in-place sum: a sum whose operand has itself taken over an allocation takes that allocation
        over in turn, so the storage made by the first gradient's op carries the whole chain.
        Returns, for each old event position, the new position, for whoever kept positions."""
        ops = self.event_ops
        replace: dict[tuple[int, bool], tuple[int, bool] | None] = {}
        shown_at: dict[int, tuple[int, bool]] = {}  # fused sum -> the allocation event now showing it
        for pos, (index, is_alloc) in enumerate(self.events):
            rec = self.records[index]
            if not is_alloc or rec.sums_into is None:
                continue
            for later in range(pos + 1, len(self.events)):
                other, other_alloc = self.events[later]
                if other_alloc or ops[later] != ops[pos]:
                    break
                operand = self.records[other]
                if other == rec.sums_into and operand.nbytes == rec.nbytes and operand.birth is None:
                    first = shown_at.pop(other, (other, True))
                    replace[first], shown_at[index] = (index, True), first
                    replace[(other, False)] = None
                    replace[(index, True)] = None
                    operand.nbytes = 0
                    break
        kept_before = [0]  # kept_before[i]: how many of the first i events survive
        events, event_ops, free_modules = [], [], []
        for event, op, module in zip(self.events, ops, self.free_modules):
            event = replace.get(event, event)
            if event is not None:
                events.append(event)
                event_ops.append(op)
                free_modules.append(module if not event[1] else None)
            kept_before.append(len(events))
        self.events, self.event_ops, self.free_modules = events, event_ops, free_modules
        return kept_before
