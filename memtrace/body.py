"""Traces a callable that writes out a whole training step (a test body under ``@pytest.mark.vram_limit``):
it builds its own model, optimizer and tensors under the same fake-tensor tracing as ``engine.trace``.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .engine import (ModuleInfo, Trace, TraceError, _explain, _mark_optimizer_states, _quiet_fake_tensor_log,
                     _shape_of, fake_cache_for, preserved_rng, remember)
from .datadep import describe_choices
from .options import Category, Options, Phase
from .targets import FunctionRules, Target, target_for
from .tracer import ModuleCall, StorageRecord, StorageTracker



class _BodyTracker(StorageTracker):
    """The tracker for a traced callable. A storage the body itself makes (outside any module, backward or
    optimizer step) with a factory function (``torch.randn``, ``torch.zeros``, ``torch.tensor``; no tensor
    argument) is an input; parameters and buffers among them are reclassified when a module registers them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self.where
        top_level = not self.module_stack and where.label == _BODY and where.birth is None  # not in backward or a step
        if top_level and not any(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0]):
            where.birth = Category.INPUT
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                where.birth = None
        return super().__torch_dispatch__(func, types, args, kwargs)


# torch/amp/autocast_mode.py: CUDA autocast without CUDA turns itself off with a warning, "User provided
# device_type of 'cuda', but CUDA is not available. Disabling" (PyTorch 2.5) or "... Disabling autocast."
_AUTOCAST_WARNINGS = ("Disabling autocast", "User provided device_type of 'cuda'")


def _off_cuda(value):
    """A CUDA device (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``) becomes the traced device."""
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.split(":", 1)[0] == "cuda":
        return "cpu"
    return value


class _BodyMode(TorchFunctionMode):
    """Runs the body's own code as the traced step. Every tensor is traced on the CPU-side fake device that
    stands in for the GPU (fake CUDA tensors cannot run backward without one), so CUDA placements are
    mapped onto it: ``.cuda()`` and ``.pin_memory()`` return the tensor, ``device="cuda"`` arguments
    become the traced device. ``backward()`` calls mark the backward phase (``torch.autograd.grad`` does not:
    a gradient penalty inside a step would otherwise end it)."""

    def __init__(self, session: _BodySession):
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cuda"):  # on a machine with CUDA: it would not reach the CPU-side tensors
            raise TraceError(_AUTOCAST_MESSAGE)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.backward or func is _AUTOGRAD_BACKWARD:
            return self.session.backward(func, args, kwargs)
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _off_cuda(kwargs["device"])}
        if func is torch.Tensor.to:
            args = tuple(_off_cuda(a) for a in args)
        return func(*args, **kwargs)


_AUTOGRAD_BACKWARD = torch.autograd.backward


@contextlib.contextmanager
def _autograd_backward_seen(session: _BodySession):
    """``torch.autograd.backward`` reaches torch-function modes only in newer PyTorch (2.5 calls the engine
    directly); while the body runs it is wrapped, so that a direct call marks the backward phase too."""
    torch.autograd.backward = lambda *args, **kwargs: session.backward(_AUTOGRAD_BACKWARD, args, kwargs)
    try:
        yield
    finally:
        torch.autograd.backward = _AUTOGRAD_BACKWARD


_AUTOCAST_MESSAGE = (
    "the body enters torch.autocast('cuda'), which cannot be traced: it turns itself off where there is no "
    "CUDA and never reaches the CPU-side tensors memtrace traces on; predict mixed precision with "
    "memtrace.report(model, ..., amp='fp16' or 'bf16')")


class _BodySession:
    """The state of one traced callable: phases and iterations as the body reaches them, the names of the
    modules it calls, and the roles (parameter, gradient, optimizer state) of what it allocates. Nothing
    here holds a tensor: the body's own references decide when its memory is freed."""

    def __init__(self, tracker: _BodyTracker, target: Target):
        self.tracker = tracker
        self.target = target
        self.phase_starts: list[tuple[Phase, int, int]] = [(Phase.SETUP, 0, 0)]
        self.iteration = 0
        self.modules: weakref.WeakSet = weakref.WeakSet()  # every module that registered a tensor
        self.names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> dotted name
        self.optimizers: weakref.WeakSet = weakref.WeakSet()
        self.infos: dict[str, dict] = {}  # name -> type, depth, output shape, {param name: (shape, dtype)}
        self.param_records: dict[str, StorageRecord] = {}
        self.grad_records: dict[str, list[StorageRecord]] = {}
        self.state_records: dict[str, list[StorageRecord]] = {}
        self.param_names: dict[int, str] = {}  # id of a named module's parameter -> "module.param"
        self.param_count = self.trainable_count = 0  # the most parameters alive at once
        self.in_backward = False
        tracker.where = ModuleCall(Phase.SETUP, 0, None, _BODY)

    # ---- phases --------------------------------------------------------------------------------
    def set_phase(self, phase: Phase, label: str = None) -> None:
        where = self.tracker.where
        if phase is not where.phase:
            if phase is Phase.FORWARD and where.phase in (Phase.BACKWARD, Phase.OPTIMIZER):
                self.iteration += 1
            self.phase_starts.append((phase, self.iteration, len(self.tracker.events)))
        self.tracker.where = ModuleCall(phase, self.iteration, None, label or _BODY)

    def backward(self, func, args, kwargs):
        if self.in_backward:  # Tensor.backward calls torch.autograd.backward: one backward, seen twice
            return func(*args, **kwargs)
        self.mark()
        self.set_phase(Phase.BACKWARD, "(backward)")
        self.in_backward = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_backward = False
        self.mark()
        self.set_phase(Phase.OPTIMIZER)  # what follows backward (clipping, the step) until the next forward
        return out

    def before_step(self, optimizer, args, kwargs) -> None:
        if optimizer not in self.optimizers:
            self.optimizers.add(optimizer)
            self.target.prepare_optimizer(optimizer)
        self.mark()
        self.set_phase(Phase.OPTIMIZER, "(optimizer)")

    def after_step(self, optimizer, args, kwargs) -> None:
        self.mark()
        self.set_phase(Phase.OPTIMIZER)

    # ---- modules -------------------------------------------------------------------------------
    def registered(self, module, name, tensor) -> None:
        self.modules.add(module)
        if tensor is not None:
            rec = self.tracker.record_of(tensor)
            if rec is not None:
                rec.birth = Category.PARAMETER if isinstance(tensor, torch.nn.Parameter) else Category.BUFFER

    def before_forward(self, module, args) -> None:
        tracker = self.tracker
        if not tracker.module_stack and tracker.where.phase is not Phase.BACKWARD:
            if module not in self.names:
                self._name_tree(module)
            self.mark()
            self.set_phase(Phase.FORWARD)
        name = self.names.get(module)
        if name is None:  # a module created during another's forward
            name = f"{tracker.module_stack[-1][0] if tracker.module_stack else ''}.{type(module).__name__}".lstrip(".")
            self.names[module] = name
            self.infos.setdefault(name, {"type": type(module).__name__, "depth": name.count(".") + 1,
                                         "shape": None, "params": {}})
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        tracker.enter_module(name, (type(module).__name__, shapes))

    def after_forward(self, module, args, out) -> None:
        info = self.infos.get(self.names.get(module))
        if info is not None and info["shape"] is None:
            info["shape"] = _shape_of(out)
        self.tracker.exit_module()

    def _name_tree(self, root) -> None:
        """A module first called from the body itself is a root: the first is named "" as in ``trace``, a
        later one (a loss module) by its class."""
        if not self.infos:
            prefix = ""
        else:
            prefix, k = type(root).__name__, 2
            while prefix in self.infos:
                prefix, k = f"{type(root).__name__}_{k}", k + 1
        for sub, module in root.named_modules():
            if module in self.names:
                continue
            name = f"{prefix}.{sub}".strip(".") if sub else prefix
            self.names[module] = name
            self.modules.add(module)
            self.infos[name] = {"type": type(module).__name__, "depth": name.count(".") + 1 if name else 0,
                                "shape": None, "params": {}}

    # ---- roles ---------------------------------------------------------------------------------
    def mark(self) -> None:
        """Give the live parameters, buffers, gradients and optimizer states their category."""
        tracker = self.tracker
        seen: dict[int, torch.Tensor] = {}
        for module in list(self.modules):
            name = self.names.get(module)
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                seen[id(p)] = p
                self._mark_param(p)
                if name is not None:
                    qualified = f"{name}.{pname}".lstrip(".")
                    self.infos[name]["params"].setdefault(pname, (tuple(p.shape), p.dtype))
                    tracker.param_module[id(p)] = name
                    self.param_names[id(p)] = qualified
                    rec = tracker.record_of(p)
                    if rec is not None:
                        self.param_records[qualified] = rec
                    if p.grad is not None:
                        remember(self.grad_records, qualified, tracker.record_of(p.grad))
            for b in module._buffers.values():
                rec = tracker.record_of(b) if b is not None else None
                if rec is not None:
                    rec.birth = Category.BUFFER
        for optimizer in list(self.optimizers):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    seen.setdefault(id(p), p)
                    self._mark_param(p)
            for p, rec in _mark_optimizer_states(tracker, self.target, optimizer):
                if id(p) in self.param_names:
                    remember(self.state_records, self.param_names[id(p)], rec)
        count = sum(p.numel() for p in seen.values())
        if count > self.param_count:
            self.param_count = count
            self.trainable_count = sum(p.numel() for p in seen.values() if p.requires_grad)

    def _mark_param(self, p: torch.Tensor) -> None:
        rec = self.tracker.record_of(p)
        if rec is not None:
            rec.birth = Category.PARAMETER
        if p.grad is not None:
            self.tracker.mark_role(p.grad, Category.GRADIENT)

    def module_infos(self) -> list[ModuleInfo]:
        """The modules the body called, each with meta tensors standing for the parameters it owned."""
        infos = []
        for name, info in self.infos.items():
            params = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in info["params"].values()]
            infos.append(ModuleInfo(name, info["type"], info["depth"], params, info["shape"]))
        return infos


_BODY = "(test body)"
_REAL_TENSOR = "Please convert all Tensors to FakeTensors"  # FakeTensorMode's error for a real tensor input


def trace_callable(fn, options: Options) -> tuple[Trace, _BodySession]:
    """Trace ``fn()``, a training step written out in full: it builds its own model, optimizer and tensors,
    all of them fake, under the tracker. Only ``options.device`` and ``options.gpu`` are read.

    Known limitations, each failing with a ``TraceError`` that says so rather than mispredicting:
    - Tensors made before the call (a fixture's model, a module-level constant) or outside torch's factory
      functions (``torch.from_numpy``, ``torch.load``, a DataLoader's batches) are real; they are refused.
    - ``torch.autocast("cuda")`` turns itself off without CUDA; mixed precision is refused.
    - Values do not exist: ``.item()`` answers 0, ``bool(tensor)`` False (listed as assumptions), so an
      assertion on a value fails; ``torch.cuda`` calls that need a device fail.
    Every tensor the body creates counts as device memory, including ones it keeps on the CPU on purpose.
    """
    import warnings

    target = target_for(options.device, options.gpu, options.alloc_conf)
    fake_cache_for(target)
    tracker = _BodyTracker(target)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    # FakeTensorMode memoises each fresh output with a weak reference, and torch.utils.swap_tensors, which
    # Module.to() / .cuda() / .half() use on fake parameters, refuses tensors that have one
    fake_mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None
    session = _BodySession(tracker, target)
    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks

    handles = []
    with preserved_rng(), _quiet_fake_tensor_log(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            handles = [
                module_hooks.register_module_parameter_registration_hook(session.registered),
                module_hooks.register_module_buffer_registration_hook(session.registered),
                module_hooks.register_module_forward_pre_hook(session.before_forward),
                module_hooks.register_module_forward_hook(session.after_forward, always_call=True),
                optimizer_hooks.register_optimizer_step_pre_hook(session.before_step),
                optimizer_hooks.register_optimizer_step_post_hook(session.after_step),
            ]
            rules = FunctionRules.for_target(target, tracker.note)
            with fake_mode, tracker, rules, _BodyMode(session), _autograd_backward_seen(session), \
                    tracker.saved_tensors_hooks(), tracker.generator_states_seen():
                try:
                    fn()
                    session.mark()
                except Exception as exc:
                    raise _explain_body(exc, tracker) from exc
                finally:
                    tracker.stop()
        finally:
            for h in handles:
                h.remove()
    for w in caught:
        if any(text in str(w.message) for text in _AUTOCAST_WARNINGS):
            raise TraceError(_AUTOCAST_MESSAGE)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    new_position = tracker.fuse_accumulations()
    phase_starts = [(phase, it, new_position[start]) for phase, it, start in session.phase_starts]
    infos = session.module_infos()
    param_owner = {}
    for info in infos:
        for pname in session.infos[info.name]["params"]:
            param_owner[f"{info.name}.{pname}".lstrip(".")] = info.name
    param_records = {k: v for k, v in session.param_records.items() if k in param_owner}
    return Trace(
        target=target, records=tracker.records, events=tracker.events, event_ops=tracker.event_ops,
        phase_starts=phase_starts, modules=infos, param_records=param_records,
        grad_records=session.grad_records, state_records=session.state_records, param_owner=param_owner,
        assumptions=tracker.assumptions, op_count=tracker.op_count,
    ), session


def _explain_body(exc: Exception, tracker: StorageTracker) -> Exception:
    if isinstance(exc, TraceError):
        return exc
    if _REAL_TENSOR in str(exc):
        return TraceError(
            f"the body used a real tensor, made before it ran (a fixture's or a module-level model) or outside "
            f"torch's factory functions (torch.from_numpy, torch.load, a DataLoader), at op {tracker.last_op}: "
            "build the model and its inputs inside the body")
    if isinstance(exc, AssertionError):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "assert"
        values = "; ".join(describe_choices(tracker.assumptions)[:3])
        return TraceError(f"an assertion in the body failed on fake tensors, which have no values "
                          f"({values or 'no value was asked'}): AssertionError: {detail}")
    return _explain(exc, tracker)
