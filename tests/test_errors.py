"""Every bad input gets a one-line error that names the argument, the value given and the valid choices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace
from memtrace import LossError, TraceError

from tiny_models import make_mlp


def error_of(call) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


# (kwargs, exception type, substrings the message must contain: argument, value, choices)
BAD_OPTIONS = [
    pytest.param(dict(optimizer="adamx"), ValueError, ["optimizer=", "'adamx'", "'sgd'", "'adam'", "None"],
                 id="optimizer-name"),
    pytest.param(dict(optimizer=3), TypeError, ["optimizer=3", "'sgd'"], id="optimizer-type"),
    pytest.param(dict(amp="fp8"), ValueError, ["amp=", "'fp8'", "'fp16'", "'bf16'"], id="amp"),
    pytest.param(dict(dtype="float8"), ValueError, ["dtype=", "'float8'", "'float32'", "'bf16'"], id="dtype-name"),
    pytest.param(dict(dtype=torch.int32), ValueError, ["dtype=", "int32", "floating", "'float32'"], id="dtype-int"),
    pytest.param(dict(device="tpu"), ValueError, ["device=", "'tpu'", "'cuda'", "'cpu'"], id="device"),
    pytest.param(dict(device="mps"), ValueError, ["device=", "'mps'", "'cuda'", "'cpu'"], id="device-mps"),
    pytest.param(dict(steps=0), ValueError, ["steps=0", ">= 1"], id="steps"),
    pytest.param(dict(train="yes"), TypeError, ["train='yes'", "True or False"], id="train"),
    pytest.param(dict(loss_fn=3), TypeError, ["loss_fn=3", "callable"], id="loss_fn-type"),
    pytest.param(dict(optimizer_kwargs=[1]), TypeError, ["optimizer_kwargs=[1]", "dict"], id="optimizer_kwargs-type"),
    pytest.param(dict(optimizer=None, optimizer_kwargs={"lr": 1}), ValueError, ["optimizer_kwargs=", "optimizer=None"],
                 id="optimizer_kwargs-without-optimizer"),
    pytest.param(dict(amp=True, dtype="fp16"), ValueError, ["amp=True", "float32", "dtype="], id="amp-with-half"),
]


@pytest.mark.parametrize("kwargs, exc_type, parts", BAD_OPTIONS)
def test_bad_option_is_named(kwargs, exc_type, parts):
    exc = error_of(lambda: memtrace.report(make_mlp(), (2, 4), **kwargs))
    assert type(exc) is exc_type
    msg = one_line(exc)
    for part in parts:
        assert part in msg, f"{part!r} missing from {msg!r}"


@pytest.mark.parametrize("input_shape, inputs, given", [((2, 4), torch.zeros(2, 4), "both"), (None, None, "neither")])
def test_exactly_one_of_input_shape_and_inputs(input_shape, inputs, given):
    exc = error_of(lambda: memtrace.report(make_mlp(), input_shape, inputs=inputs))
    assert isinstance(exc, ValueError)
    msg = one_line(exc)
    assert "input_shape=" in msg and "inputs=" in msg and given in msg


@pytest.mark.parametrize("input_shape, exc_type", [(5, TypeError), ((2.5, 4), ValueError), ((-1, 4), ValueError),
                                                  ((), ValueError)])
def test_bad_input_shape_is_named(input_shape, exc_type):
    exc = error_of(lambda: memtrace.report(make_mlp(), input_shape))
    assert type(exc) is exc_type
    msg = one_line(exc)
    assert f"input_shape={input_shape!r}" in msg


def test_input_shape_string_is_named():
    exc = error_of(lambda: memtrace.report(make_mlp(), "abc"))
    assert "input_shape=" in str(exc), str(exc)


@pytest.mark.parametrize("inputs, exc_type, part", [
    ([], ValueError, "empty"), ({}, ValueError, "empty"), ([3], ValueError, "holds no tensor"),
    (3, TypeError, "inputs="), ({"x": object()}, TypeError, "holds a object at x"),
    ({"x": [torch.zeros(1), {"y": object()}]}, TypeError, "holds a object at x[1].y"),
    ({"x": {1: torch.zeros(1)}}, TypeError, "dict at x with keys that are not strings"),
    ({"not a name": torch.zeros(1)}, TypeError, "keys must be names"),
])
def test_bad_inputs_are_named(inputs, exc_type, part):
    exc = error_of(lambda: memtrace.report(make_mlp(), inputs=inputs))
    assert type(exc) is exc_type
    assert part in one_line(exc)


@pytest.mark.parametrize("model, type_name", [("model", "str"), (lambda x: x, "function"), (None, "NoneType")])
def test_model_must_be_a_module(model, type_name):
    exc = error_of(lambda: memtrace.report(model, (2, 4)))
    assert isinstance(exc, TypeError)
    msg = one_line(exc)
    assert "model" in msg and type_name in msg and "torch.nn.Module" in msg


def test_unknown_optimizer_kwarg_is_named():
    exc = error_of(lambda: memtrace.report(make_mlp(), (2, 4), optimizer_kwargs={"lrx": 1}))
    assert "optimizer_kwargs" in str(exc), str(exc)


def test_device_string_with_index_is_accepted_like_torch_device():
    by_string = memtrace.report(make_mlp(), (2, 4), device="cuda:0")
    by_device = memtrace.report(make_mlp(), (2, 4), device=torch.device("cuda:0"))
    assert by_string.peak_bytes == by_device.peak_bytes


# ---- errors raised while tracing ---------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn, shown", [(lambda out, batch: out, "(2, 2)"), (lambda out, batch: out.sum(1), "(2,)"),
                                            (lambda out, batch: 3.0, "float")])
def test_loss_fn_must_return_a_scalar(loss_fn, shown):
    exc = error_of(lambda: memtrace.report(make_mlp(), (2, 4), loss_fn=loss_fn))
    assert isinstance(exc, LossError) and isinstance(exc, ValueError)
    msg = one_line(exc)
    assert "loss_fn" in msg and shown in msg


def test_model_without_floating_output_needs_a_loss_fn():
    class Classify(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).argmax(-1)

    exc = error_of(lambda: memtrace.report(Classify(), (2, 4)))
    assert isinstance(exc, LossError)
    assert "loss_fn=" in one_line(exc)


def test_shape_rejected_by_a_layer_names_it():
    # Linear(4, 8) accepts (2, 4); Linear(6, 2), the Sequential's module '1', rejects the (2, 8) it gets
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(6, 2))
    exc = error_of(lambda: memtrace.report(model, (2, 4)))
    assert isinstance(exc, TraceError)
    msg = one_line(exc)
    assert "'1'" in msg and "[2, 8]" in msg
    assert "forward" in msg and "iteration 0" in msg
    assert "addmm" in msg  # the op that failed
    assert isinstance(exc.__cause__, RuntimeError)  # the original error stays attached


def test_error_in_a_nested_module_names_the_dotted_path():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(5, 2)))
    msg = one_line(error_of(lambda: memtrace.report(model, (3, 4))))
    assert "'1.1'" in msg and "[3, 8]" in msg


def test_failed_trace_leaves_no_mode_behind():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(6, 2))
    with pytest.raises(TraceError):
        memtrace.report(model, (2, 4))
    assert torch._C._len_torch_dispatch_stack() == 0
    y = torch.ones(2) + 1
    assert type(y) is torch.Tensor and y.tolist() == [2.0, 2.0]  # real tensors again, not fake ones
    assert torch.is_grad_enabled()
    # and the next estimate works
    assert memtrace.report(make_mlp(), (2, 4), device="cpu").peak_bytes > 0


def test_optimizer_callable_must_return_an_optimizer():
    exc = error_of(lambda: memtrace.report(make_mlp(), (2, 4), optimizer=lambda params: 3))
    assert isinstance(exc, TypeError)
    msg = one_line(exc)
    assert "optimizer" in msg and "int" in msg and "torch.optim.Optimizer" in msg


def test_optimizer_class_must_be_an_optimizer():
    msg = one_line(error_of(lambda: memtrace.report(make_mlp(), (2, 4), optimizer=nn.Linear)))
    assert "optimizer=" in msg and "Linear" in msg and "torch.optim.Optimizer subclass" in msg


# ---- what is accepted: the same step, written several ways ----------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(input_shape=[3, 4], optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}),
    dict(input_shape=(3, 4), optimizer=lambda params: torch.optim.SGD(params, lr=0.1)),
    dict(input_shape=(3, 4), optimizer="SGD", optimizer_kwargs={"lr": 0.1}, device="CPU", dtype="torch.float32",
         amp="OFF"),
    dict(inputs=torch.empty(3, 4, device="meta"), optimizer="sgd", device=torch.device("cpu"), dtype="fp32",
         amp=None),
], ids=["class", "callable", "spellings", "meta-input"])
def test_equivalent_spellings(kwargs):
    kwargs = {"device": "cpu", **kwargs}
    reference = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu")
    assert memtrace.report(make_mlp(), **kwargs).peak_bytes == reference.peak_bytes == 672


# ---- a card given by hand ----------------------------------------------------------------------------------

def test_gpu_parses_a_size_and_checks_its_fields():
    assert memtrace.GPU("RTX A4000", "16 GiB", (8, 6)).memory_bytes == 16 * 2**30
    assert memtrace.GPU("x", 2**34, [8, 6]).capability == (8, 6)


@pytest.mark.parametrize("args, part", [
    (("x", "24 bananas", (8, 0)), "GPU 'x': memory_bytes='24 bananas': cannot read size"),
    (("x", -1, (8, 0)), "memory_bytes=-1 must be a positive number of bytes"),
    (("x", 2**30, (8,)), "capability=(8,) must be the compute capability as (major, minor)"),
    (("x", 2**30, "8.0"), "capability='8.0'"),
    (("x", 2**30, (8, 0), 0), "multiprocessors=0 must be a positive int"),
    (("", 2**30, (8, 0)), "name='' must be a non-empty string"),
])
def test_bad_gpu_is_refused_at_construction(args, part):
    exc = error_of(lambda: memtrace.GPU(*args))
    assert isinstance(exc, ValueError) and part in one_line(exc)


def test_measure_refuses_checkpoint_it_would_not_apply():
    # measure() runs the model as it is; a checkpoint= it ignored would measure an uncheckpointed step
    with pytest.raises(ValueError, match="does not apply checkpoint="):
        memtrace.measure(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), (2, 4), device="cpu",
                         checkpoint="auto")


def test_compile_on_a_pytorch_without_it_is_refused():
    from memtrace.targets import TORCH_VERSION

    model = nn.Sequential(nn.Linear(4, 4))
    if TORCH_VERSION >= (2, 6):
        assert memtrace.report(model, (2, 4), device="cpu", compile=False).peak_bytes > 0
        return
    with pytest.raises(ValueError, match="needs PyTorch 2.6 or later"):
        memtrace.report(model, (2, 4), device="cpu", compile=True)
