"""Traces the training step on fake tensors and returns what happened to every storage.

The user's model is never touched: its module tree is deep-copied with every parameter, buffer and tensor
attribute replaced by a fake tensor of the same shape (``copy.deepcopy`` with a pre-filled memo), so no
real memory is allocated, and the copy gets the hooks that attribute allocations to modules.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from . import quantized
from .options import Category, Options, Phase
from .step import build_optimizer, run_steps
from .targets import FunctionRules, Target, target_for
from .datadep import ITEM, SizePolicy
from .flops import FlopCounter
from .tracer import ModuleCall, SavedTensorModifiedError, StorageRecord, StorageTracker, local


class TraceError(RuntimeError):
    """The model could not be run on fake tensors; the message names the module and the op."""


@dataclass
class ModuleInfo:
    name: str
    type: str
    depth: int
    params: list[torch.Tensor] = field(default_factory=list)  # fake parameters it owns directly
    output_shape: tuple | None = None


@dataclass
class Trace:
    target: Target
    records: list[StorageRecord]
    events: list[tuple[int, bool]]
    event_ops: list[int]
    phase_starts: list[tuple[Phase, int, int]]  # (phase, iteration, first event index)
    modules: list[ModuleInfo]
    param_records: dict[str, StorageRecord]  # parameter name -> its storage
    grad_records: dict[str, list[StorageRecord]]
    state_records: dict[str, list[StorageRecord]]
    param_owner: dict[str, str]
    assumptions: list
    op_count: int
    flops: dict = field(default_factory=dict)  # phase -> first iteration's FLOPs (matmuls, convolutions, attention)
    notes: tuple[str, ...] = ()  # what the target's rules say the prediction leaves out for this model
    shard_layout: tuple = ()  # sharded: each parameter's global shape and the dimension tensor parallel shards
    rank_keys: tuple = ()  # what each rank holds, where the trace knows it for every rank (ZeRO's partitions)
    sized: tuple = ()  # rules' scratch sized by a function of the op's shapes: StorageTracker.allocate_sized
    # per event, for a free, the module running when it happened (None for an allocation); what depth.splice
    # lines up by. Empty in a trace a batch line builds (sweep.Line).
    free_modules: list = field(default_factory=list)


def remember(table: dict[str, list[StorageRecord]], key: str, rec: StorageRecord | None) -> None:
    """Adds ``rec`` to ``table[key]`` once (a parameter's gradient or state records)."""
    if rec is not None:
        recs = table.setdefault(key, [])
        if rec not in recs:
            recs.append(rec)


@contextlib.contextmanager
def preserved_rng():
    cpu = torch.get_rng_state()
    py = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(py)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """FakeTensorMode logs a traceback for every failing meta kernel; the TraceError says it in a line."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fake_like(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A fake tensor of ``t``'s shape and strides; floating-point ones converted to ``dtype`` when given, as
    ``Module.to(dtype)`` converts them."""
    dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dt, device="cpu")


def _held_tensors(value, seen: set[int]):
    """The tensors and modules reachable from a module's plain attribute: the value itself, or inside lists,
    tuples, sets and dicts, nested (torchvision's anchor generator keeps its cell anchors in a list)."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _held_tensors(v, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _held_tensors(v, seen)


def _fake_copy(model: torch.nn.Module, options: Options, tracker: StorageTracker) -> torch.nn.Module:
    """Deep-copy ``model`` with fake tensors, created in the order ``Module.to()`` moves them (children
    first, then parameters, then buffers), so the allocator model sees the same sequence. Tensors held in
    plain attributes, also inside lists, tuples and dicts, are made fake too: ``Module.to()`` moves none of
    them, but a deep copy must not copy their data."""
    quantized.refuse_unsupported(model)
    memo: dict[int, object] = {}
    visited: set[int] = set()

    def visit(module: torch.nn.Module) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        for child in module.children():
            visit(child)
        tracker.where.birth = Category.PARAMETER
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                if quantized.is_4bit(p):
                    memo[id(p)] = quantized.fake_4bit(p, memo, tracker, lambda t: _fake_like(t, None), options.dtype)
                else:
                    memo[id(p)] = torch.nn.Parameter(_fake_like(p, options.dtype), requires_grad=p.requires_grad)
        tracker.where.birth = Category.BUFFER
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = _fake_like(b, options.dtype)
        seen: set[int] = set()
        for value in vars(module).values():
            if isinstance(value, (dict, list, tuple, set, frozenset, torch.Tensor)):
                for held in _held_tensors(value, seen):
                    if isinstance(held, torch.nn.Module):  # a module kept outside the tree (a plain list)
                        visit(held)
                        tracker.where.birth = Category.BUFFER
                    elif id(held) not in memo:
                        memo[id(held)] = _fake_like(held, None)

    visit(model)
    tracker.where.birth = None
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise TraceError(f"cannot copy {type(model).__name__} to fake tensors: {exc}") from exc


@contextlib.contextmanager
def _innermost_saved_tensors_hooks():
    """Yields a function that returns the (pack, unpack) saved-tensor hooks autograd applies now, the
    innermost ones. PyTorch 2.5 has no call that reads them; there the hooks of the non-reentrant
    checkpoint's recomputation (the only ones asked for) are noted as they are entered, while this runs."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None:
        yield lambda: top(False)
        return
    from torch.utils import checkpoint
    cls = checkpoint._recomputation_hook
    entered: list[tuple] = []
    own = {name: cls.__dict__.get(name) for name in ("__enter__", "__exit__")}
    enter, leave = cls.__enter__, cls.__exit__

    def noted_enter(self):
        entered.append((self.pack_hook, self.unpack_hook))
        return enter(self)

    def noted_exit(self, *exc):
        entered.pop()
        return leave(self, *exc)

    cls.__enter__, cls.__exit__ = noted_enter, noted_exit
    try:
        yield lambda: entered[-1]
    finally:
        for name, value in own.items():
            if value is None:
                delattr(cls, name)
            else:
                setattr(cls, name, value)


def _checkpoint_modules(model: torch.nn.Module, names: tuple[str, ...], tracker: StorageTracker,
                        target: Target, innermost_hooks) -> None:
    """Run the named modules of the fake copy under non-reentrant ``torch.utils.checkpoint``, as a user who
    wraps their blocks does: only each block's inputs are saved in forward, and backward recomputes the
    block. The tensors the recomputation saves for backward are activations too; the checkpoint's own
    saved-tensor hook, innermost during recomputation, would hide them from the tracer's, so it is chained.
    The autograd engine runs backward without the torch-function modes of the forward, so the target's
    function rules are entered again for the recomputation to make the same choices (attention backend,
    fused dropout) as the forward did."""
    from torch.utils.checkpoint import checkpoint

    def wrap(forward):
        def recompute_aware(*args, **kwargs):
            if tracker.where.phase is not Phase.BACKWARD:
                return forward(*args, **kwargs)
            inner_pack, inner_unpack = innermost_hooks()

            def pack(t):
                tracker.mark_saved(t)
                return inner_pack(t)

            rules = FunctionRules.for_target(target, tracker.note)
            with rules, torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
                return forward(*args, **kwargs)

        def checkpointed(*args, **kwargs):
            return checkpoint(recompute_aware, *args, use_reentrant=False, **kwargs)
        return checkpointed

    def hugging_face_checkpoint(fn, *args, **kwargs):
        return wrap(fn)(*args, **kwargs)

    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if any(c.__name__ == "GradientCheckpointingLayer" for c in type(module).__mro__):
            # a Hugging Face layer checkpoints itself as gradient_checkpointing_enable() makes it, dropping
            # the key/value cache arguments that a recomputation would update a second time. That call
            # sets the flag on every module that has one: the models around the layer read it too, and
            # some (GPT-2, which passes the cache positionally) withhold the cache only then.
            path = name.split(".")
            for owner in (modules[".".join(path[:i])] for i in range(len(path) + 1)):
                if isinstance(getattr(owner, "gradient_checkpointing", None), bool):
                    owner.gradient_checkpointing = True
                    owner._gradient_checkpointing_func = hugging_face_checkpoint
        else:
            module.forward = wrap(module.forward)


def _is_compiled_wrapper(module: torch.nn.Module) -> bool:
    """``torch.compile(module)``'s ``OptimizedModule`` (checked by name: importing Dynamo is slow)."""
    return any(c.__name__ == "OptimizedModule" and c.__module__.startswith("torch._dynamo") for c in type(module).__mro__)


def eager_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped, or ``model`` itself."""
    while _is_compiled_wrapper(model) and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def about_the_model(model: torch.nn.Module, options: Options) -> list[str]:
    """What the report must say about how the model given differs from the step traced."""
    notes = []
    compiled = [name or "the root module" for name, m in model.named_modules()
                if _is_compiled_wrapper(m) or getattr(m, "_compiled_call_impl", None) is not None]
    if options.compile is not None:
        compiled = []  # the whole forward is compiled, compiled submodules inlined, as Dynamo does
    if compiled:
        named = ", ".join(f"'{n}'" for n in compiled[:4]) + (" and more" if len(compiled) > 4 else "")
        which = ("The model is" if not compiled or compiled == ["the root module"] else
                 f"Module {named} is" if len(compiled) == 1 else f"Modules {named} are")
        notes.append(f"{which} compiled with torch.compile; this report shows the eager "
                     "step. A compiled step can peak lower (Inductor fuses pointwise ops, so their intermediates never "
                     "exist, and AOTAutograd's partitioner recomputes cheap ops instead of saving them) or, less "
                     "often, higher.")
    if options.train:
        in_eval = [name or "the root module" for name, m in eager_module(model).named_modules() if not m.training]
        if in_eval:
            shown = ", ".join(repr(n) for n in in_eval[:3]) + (", ..." if len(in_eval) > 3 else "")
            which = ("The model was" if in_eval[0] == "the root module" else
                     f"Module {shown} was" if len(in_eval) == 1 else f"{len(in_eval)} modules ({shown}) were")
            notes.append(f"{which} in eval mode; the training step is traced in train mode, as model.train() sets it "
                         "in a training loop (dropout active, batch norm updating its statistics). Pass train=False "
                         "for an inference step.")
    return notes


def _type_name(module: torch.nn.Module) -> str:
    """The module's class name; for a module ``fully_shard`` wrapped (class FSDP<name>), the class it wraps."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        return cls.__bases__[1].__name__
    return cls.__name__


def _module_infos(model: torch.nn.Module) -> list[ModuleInfo]:
    infos = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        info = ModuleInfo(name, _type_name(module), 0 if not name else name.count(".") + 1)
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                info.params.append(p)
        infos.append(info)
    return infos


def _shape_of(out) -> tuple | None:
    """The shape shown for a module's output: the tensor, the first of a tuple, or the logits / hidden
    state of a dict-like output (Hugging Face ``ModelOutput`` is both a dict and has attributes)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return tuple(out[0].shape)
    if isinstance(out, Mapping):
        for name in ("logits", "last_hidden_state"):
            if isinstance(out.get(name), torch.Tensor):
                return tuple(out[name].shape)
        first = next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
        return tuple(first.shape) if first is not None else None
    return None


def _install_hooks(model, infos, tracker, first: bool = False) -> list:
    """Forward hooks that tell the tracker which module runs; ``first``: before the module's other
    pre-hooks (FSDP's all-gather belongs to the module it gathers for)."""
    handles = []
    info_of = {i.name: i for i in infos}
    for name, module in model.named_modules():
        info = info_of[name]

        def pre(mod, args, _name=name):
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            tracker.enter_module(_name, (type(mod).__name__, shapes))

        def post(mod, args, out, _info=info):
            failing = sys.exc_info()[1]
            if out is None and failing is not None and type(failing).__name__ != "_StopRecomputationError":
                return  # the step fails here: the error names the module it failed in
            if _info.output_shape is None:
                _info.output_shape = _shape_of(out)
            tracker.exit_module()

        handles.append(module.register_forward_pre_hook(pre, prepend=first))
        # always_call: checkpointing stops a recomputed forward early by raising from inside it
        # (_StopRecomputationError), and the module must still be left, or the allocations after it (the
        # optimizer's) are put in that module
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


def trace(model: torch.nn.Module, options: Options, rank: int = 0, graph=None) -> Trace:
    """The step of ``model`` on fake tensors; with ``options.parallel``, as rank ``rank`` runs it. ``graph``
    (a ``graph.Recorder``) is told of every op, for ``Report.graph()``."""
    if options.parallel is None:
        return _trace(model, options, None, graph)
    from . import parallel

    spec = options.parallel
    with parallel.fake_world(spec.world_size, rank):
        return _trace(model, options, parallel.device_mesh(spec) if spec.shards else None, graph)


_CACHE_TARGET: list = [None]  # the target whose traces filled FakeTensorMode's dispatch cache


def fake_cache_for(target: Target) -> None:
    """FakeTensorMode keeps one dispatch cache for the whole process, and an entry one target's trace left
    can change another's: after a CUDA trace of an LSTM, a CPU trace of it got two more allocations from
    ``mkldnn_rnn_layer_backward`` than a CPU trace in a fresh process. The cache is cleared when the target
    changes; traces for the same target keep it (it makes a repeated trace about a third faster)."""
    if _CACHE_TARGET[0] != target.name:
        clear = getattr(FakeTensorMode, "cache_clear", None)
        if clear is not None:
            clear()
        _CACHE_TARGET[0] = target.name


def _trace(model: torch.nn.Module, options: Options, mesh, graph=None) -> Trace:
    about = about_the_model(model, options)
    model = eager_module(model)
    target = target_for(options.device, options.gpu, options.alloc_conf)
    fake_cache_for(target)
    if options.compile is not None:
        from .compiled import CompilingTracker

        tracker = CompilingTracker(target, SizePolicy(options.data_dependent))
    else:
        tracker = StorageTracker(target, SizePolicy(options.data_dependent))
    tracker.graph = graph
    sharded = mesh is not None
    replicated = options.parallel is not None and not options.parallel.shards  # DDP
    if options.parallel is not None:
        from . import parallel

        tracker.wrapper_types = parallel.wrapper_types()
        tracker.dispatch_rules = {**tracker.dispatch_rules, **parallel.op_rules()}
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    # FakeTensorMode memoises each fresh output with a weak reference, and torch.utils.swap_tensors, which
    # Module.to() uses on fake parameters, refuses tensors that have one: a module converted inside
    # forward (Switch Transformers' router) would fail
    fake_mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None
    phase_starts: list[tuple[Phase, int, int]] = []
    grad_records: dict[str, list[StorageRecord]] = {}
    state_records: dict[str, list[StorageRecord]] = {}
    flops = tracker.flops = FlopCounter()
    shard_layout: list = []

    sharding_hooks = parallel.traced(tracker) if sharded else contextlib.nullcontext()
    with preserved_rng(), _quiet_fake_tensor_log(), fake_mode, tracker, _innermost_saved_tensors_hooks() as hooks, \
            sharding_hooks:
        tracker.where = ModuleCall(Phase.SETUP, 0, None, "(setup)")
        phase_starts.append((Phase.SETUP, 0, 0))
        if sharded:  # the whole model never exists on a rank: only its shards are accounted
            tracker.recording = False
        fake_model = _fake_copy(model, options, tracker)
        if quantized.uses_bitsandbytes(model):
            quantized.after_copy(fake_model, target)
            tracker.note(quantized.note(target))
        if "bitsandbytes" in sys.modules:
            tracker.dispatch_rules = {**tracker.dispatch_rules, **quantized.op_rules(target)}
        fake_model.train(options.train)
        _checkpoint_modules(fake_model, options.checkpoint, tracker, target, hooks)
        if sharded:
            try:
                with tracker.hidden():  # nothing of the whole model is the rank's
                    fake_model = parallel.apply(fake_model, options.parallel, mesh, shard_layout)
            except (TraceError, NotImplementedError, ValueError):
                raise
            except Exception as exc:
                raise TraceError(f"parallelizing {type(model).__name__} ({options.parallel.describe()}) failed: "
                                 f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                                 ) from exc
            tracker.recording = True
            for p in fake_model.parameters():
                tracker.adopt(p, Category.PARAMETER)
            for b in fake_model.buffers():
                tracker.adopt(b, Category.BUFFER)
        runner = fake_model  # what the step calls: the model, or the DDP module around it
        if replicated:
            tracker.where.label = "(DDP)"
            runner = parallel.wrap_ddp(fake_model, options.parallel, tracker)
        if options.compile is not None:
            from .compiled import compiled_runner

            runner = compiled_runner(runner, tracker, options.compile)
        infos = _module_infos(fake_model)
        params = {name: p for name, p in fake_model.named_parameters()}
        owner = {}
        for info in infos:
            for p in info.params:
                owner[id(p)] = info.name
        name_of = {id(p): n for n, p in params.items()}
        tracker.param_module = owner
        param_records = {n: tracker.record_of(p) for n, p in params.items()}
        param_owner = {n: owner[id(p)] for n, p in params.items()}
        held = {id(r) for r in param_records.values()}
        for n, p in params.items():  # a 4-bit weight's statistics are held with it (a code shared once)
            for stat, t in quantized.statistics(n, p):
                rec = tracker.record_of(t)
                if rec is not None and id(rec) not in held:
                    param_records[stat], param_owner[stat] = rec, owner[id(p)]
                    held.add(id(rec))

        def note_gradient(name: str, grad: torch.Tensor) -> None:
            rec = tracker.record_of(grad)
            if rec is not None and rec.birth is None:
                rec.role = Category.GRADIENT
                remember(grad_records, name, rec)

        def on_grad(p):
            note_gradient(name_of[id(p)], p.grad)

        # a compiled forward is not divided by module (a hook in it would break its graph): its allocations are
        # the compiled region's
        handles = _install_hooks(fake_model, infos, tracker, first=sharded) if options.compile is None else []
        if options.train:
            handles += [p.register_post_accumulate_grad_hook(on_grad) for p in params.values() if p.requires_grad]
        with tracker.hidden():
            stepped = parallel.local_shards(params, options) if sharded else None
        rank_keys: tuple = ()
        with quantized.building_optimizers():
            if replicated and options.parallel.zero and options.optimizer is not None:
                optimizer = parallel.zero_redundancy(options, list(params.values()), target.prepare_optimizer)
                rank_keys = parallel.zero_rank_keys(optimizer)
            elif stepped is None:
                optimizer = build_optimizer(options, list(params.values()), target.prepare_optimizer)
            else:  # an elementwise optimizer over the rank's shards (parallel.local_shards says why)
                optimizer = build_optimizer(options, list(stepped.values()), target.prepare_optimizer)
                name_of.update({id(shard): name for name, shard in stepped.items()})
                parallel.clear_sharded_grads_with(optimizer, list(params.values()))
        if optimizer is not None and "bitsandbytes" in sys.modules and quantized.is_bitsandbytes_optimizer(optimizer):
            quantized.prepare_optimizer(optimizer, tracker, target)
        scaler = torch.amp.GradScaler("cpu") if (options.train and options.uses_grad_scaler) else None

        def mark_optimizer_state():
            if optimizer is None:
                return
            for p, rec in _mark_optimizer_states(tracker, target, optimizer):
                remember(state_records, name_of.get(id(p), "?"), rec)

        def mark_sharded_gradients():  # FSDP sets each sharded parameter's .grad after its reduce-scatter
            for name, p in params.items():
                tracker.mark_role(p, Category.PARAMETER)  # a shard FSDP re-padded at lazy init is one too
                if p.grad is not None:
                    note_gradient(name, p.grad)

        def on_phase(phase: Phase, it: int) -> None:
            mark_optimizer_state()
            if sharded and phase in (Phase.OPTIMIZER, Phase.FORWARD):
                mark_sharded_gradients()
            if stepped is not None and phase is Phase.OPTIMIZER:
                for name, shard in stepped.items():  # FSDP may have replaced a shard (re-padded at lazy init)
                    shard.data = local(params[name])
                    grad = params[name].grad
                    shard.grad = None if grad is None else local(grad)
            phase_starts.append((phase, it, len(tracker.events)))
            tracker.where = ModuleCall(phase, it, None, "(optimizer)" if phase is Phase.OPTIMIZER else "(loss)")

        def new_inputs():
            tracker.where.birth, tracker.where.label = Category.INPUT, "(inputs)"
            made = options.inputs.build(lambda s: torch.empty(s.shape, dtype=s.dtype, device="cpu"))
            tracker.where.birth, tracker.where.label = None, "(loss)"
            return made

        try:
            rules = FunctionRules.for_target(target, tracker.note)
            amp = target.autocast() if options.amp_dtype is not None else contextlib.nullcontext()
            with rules, amp, tracker.saved_tensors_hooks(), tracker.generator_states_seen():
                if options.compile is not None:
                    from .compiled import warm_up

                    warm_up(runner, fake_model, options, new_inputs, tracker, list(params.values()))
                run_steps(runner, options, new_inputs, optimizer, scaler, "cpu", on_phase)
        except Exception as exc:
            raise _explain(exc, tracker) from exc
        finally:
            mark_optimizer_state()
            for h in handles:
                h.remove()
        tracker.stop()
    unused = tracker.data.sizes.unused()
    if unused:
        places = list(dict.fromkeys(f"{c.module}:{c.op}" for c in tracker.assumptions)) or ["none"]
        raise ValueError(f"data_dependent= names {unused[0]!r}, which matched no op whose size or value depends on "
                         f"tensor data; the step's: {', '.join(places[:8])}{', ...' if len(places) > 8 else ''}")
    events_before_fusing = len(tracker.events)
    new_position = tracker.fuse_accumulations()
    if graph is not None:
        graph.finish(events_before_fusing, new_position)
    phase_starts = [(phase, it, new_position[start]) for phase, it, start in phase_starts]
    for call in tracker.sized:
        call.event_at = new_position[call.event_at]
    return Trace(
        target=target, records=tracker.records, events=tracker.events, event_ops=tracker.event_ops,
        phase_starts=phase_starts, modules=infos, param_records=param_records, grad_records=grad_records,
        state_records=state_records, param_owner=param_owner,
        assumptions=tracker.assumptions, op_count=tracker.op_count, flops=flops.counts,
        notes=tuple(about + tracker.notes + _upper_bound_note(tracker.assumptions)), shard_layout=tuple(shard_layout),
        rank_keys=rank_keys, sized=tuple(tracker.sized), free_modules=tracker.free_modules,
    )


def _upper_bound_note(choices) -> list[str]:
    """Sizes taken at their upper bound can put the prediction far above a real run: say so, and how to
    give the real ones."""
    upper = [c for c in choices if c.how == "upper bound"]
    if not upper:
        return []
    ops = ", ".join(dict.fromkeys(c.op for c in upper))
    modules = len({c.module for c in upper})
    return [f"Sizes that depend on tensor values ({ops}; in {modules} module{'s' if modules > 1 else ''}, listed "
            "under Assumptions) are taken at the largest the ops allow: the prediction is an upper bound for those "
            "ops and can be far above a real run (a Mask R-CNN's was 4.5 times its measured peak). "
            "memtrace.measure(..., device='cpu', record_data_dependent=True) records a real run's sizes, for "
            "report(..., data_dependent=...)."]


def _mark_optimizer_states(tracker: StorageTracker, target: Target, optimizer: torch.optim.Optimizer):
    """Classify each optimizer state tensor not classified yet; yields (parameter, its state's record), a state
    tensor several parameters share (bitsandbytes' quantisation maps) with the first of them only."""
    inner = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer's: the rank's own optimizer
    if isinstance(inner, torch.optim.Optimizer):
        optimizer = inner
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    rec = tracker.record_of(value)
                    if rec is None or rec.birth is not None or id(rec) in seen:
                        continue
                    seen.add(id(rec))
                    rec.role = Category.OPTIMIZER_STATE
                    rec.host = target.host_resident(optimizer, group, key, value)
                    yield p, rec


def _explain(exc: Exception, tracker: StorageTracker) -> Exception:
    from .step import LossError

    if isinstance(exc, (LossError, TraceError)):
        return exc
    cause, seen = exc, set()
    while cause is not None and id(cause) not in seen:  # a compiled forward's backend failed: torch.compile
        seen.add(id(cause))  # wraps what it raised (BackendCompilerFailed.inner_exception)
        if isinstance(cause, TraceError):
            return cause
        cause = getattr(cause, "inner_exception", None) or cause.__cause__ or cause.__context__
    where = tracker.where
    if isinstance(exc, SavedTensorModifiedError):  # raised between ops: no op or module of its own to name
        return TraceError(f"{where.phase.value} of iteration {where.iteration} failed: {exc}")
    if tracker.module_stack:
        name, (kind, shapes) = tracker.module_stack[-1]
        shown = ", ".join(str(list(s)) for s in shapes) or "none"
        place = f"module '{name or '(root)'}' ({kind}, input shapes {shown})"
    else:
        place = tracker.current_module()
    op = str(tracker.last_op) if tracker.last_op is not None else "?"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TraceError(f"{where.phase.value} of iteration {where.iteration} failed in {place} at op {op}: "
                      f"{type(exc).__name__}: {first_line}{_assumed_values(tracker)}")


def _assumed_values(tracker: StorageTracker) -> str:
    """A failure after values were read from tensor data, which fake tensors do not have, may come from the
    values assumed: say which, and how to give them."""
    assumed = [c for c in tracker.assumptions if c.op == ITEM and c.how == "assumed" and not c.module.startswith("(")]
    if not assumed:
        return ""
    last = assumed[-1]
    where = f"module '{last.module}'" if last.module else "the root module"
    return (f" (before it, {len(assumed)} value(s) were read from tensor data with .item() / .tolist(), which fake "
            f"tensors do not have, and assumed {last.value!r}, the last in {where}; if they set a size, give them "
            f"with data_dependent={{'{last.module}:item': [...]}})")
