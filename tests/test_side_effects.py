"""report() leaves the user's model and the process as it found them."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import memtrace


def make_model(device: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device) if device else torch.device("cpu"):
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(),
                             nn.Sequential(nn.Linear(8, 8), nn.GELU()), nn.Linear(8, 2))


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: (v.clone() if v.device.type != "meta" else v) for k, v in model.state_dict().items()},
        "devices": [t.device for t in model.state_dict().values()],
        "dtypes": [t.dtype for t in model.state_dict().values()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "ids": [id(t) for t in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("devices", "dtypes", "requires_grad", "training", "ids"):
        assert after[key] == before[key], key
    for name, value in after["state"].items():
        if value.device.type != "meta":
            assert torch.equal(value, before["state"][name]), name
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
        assert not m._backward_hooks and not m._backward_pre_hooks, type(m).__name__
    for p in model.parameters():
        assert p.grad is None
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
        assert not p._backward_hooks


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("train", [True, False])
def test_model_is_unchanged(device, train):
    model = make_model()
    before = snapshot(model)
    memtrace.report(model, (3, 4), device=device, train=train, optimizer="adam")
    assert_unchanged(model, before)


def test_model_in_eval_mode_stays_in_eval_mode():
    model = make_model().eval()
    before = snapshot(model)
    r = memtrace.report(model, (3, 4), device="cpu")
    assert not any(m.training for m in model.modules())
    assert_unchanged(model, before)
    # ...but the training step is still traced in training mode: BatchNorm saves its batch statistics
    assert r.layer("1").activation_bytes > 0


def test_mixed_training_flags_survive():
    model = make_model()
    model[1].eval()  # a frozen BatchNorm inside a model in training mode
    before = snapshot(model)
    memtrace.report(model, (3, 4), device="cpu")
    assert_unchanged(model, before)
    assert model.training and not model[1].training


def test_running_stats_are_not_updated():
    model = make_model()
    bn = model[1]
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    memtrace.report(model, (3, 4), device="cpu", steps=3)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count)


def test_existing_gradients_and_frozen_parameters_are_kept():
    model = make_model()
    model[0].requires_grad_(False)
    grad = torch.full_like(model[5].weight, 3.0)
    model[5].weight.grad = grad
    r = memtrace.report(model, (3, 4), device="cpu", optimizer="sgd")
    assert model[5].weight.grad is grad and bool((grad == 3.0).all())
    assert not model[0].weight.requires_grad and model[0].weight.grad is None
    assert r.trainable_param_count == r.param_count - (4 * 8 + 8)
    assert r.layer("0").gradient_bytes == 0


def test_user_hooks_stay_installed():
    model = make_model()
    calls = []
    handle = model[0].register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    memtrace.report(model, (3, 4), device="cpu")
    assert list(model[0]._forward_hooks) == [handle.id]
    handle.remove()
    assert_unchanged(model, snapshot(model))


@pytest.mark.parametrize("device", [None, "meta"])
def test_global_state_is_restored(device):
    model = make_model(device)
    torch.manual_seed(123)
    random.seed(123)
    rng, py_rng = torch.get_rng_state(), random.getstate()
    grad_enabled, default_dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    memtrace.report(model, (3, 4), device="cpu", optimizer="adam")
    assert torch.equal(torch.get_rng_state(), rng)  # the Dropout ran on fake tensors only
    assert random.getstate() == py_rng
    assert torch.is_grad_enabled() == grad_enabled and torch.get_default_dtype() == default_dtype
    assert torch._C._len_torch_dispatch_stack() == 0
    assert not torch.is_autocast_enabled("cpu")


def test_meta_model_is_unchanged_and_estimated_like_a_real_one():
    meta = make_model("meta")
    before = snapshot(meta)
    assert all(d.type == "meta" for d in before["devices"])
    r_meta = memtrace.report(meta, (3, 4), device="cpu", optimizer="adam")
    assert_unchanged(meta, before)
    r_real = memtrace.report(make_model(), (3, 4), device="cpu", optimizer="adam")
    assert r_meta.to_dict() == r_real.to_dict()


def test_meta_inputs_are_accepted_and_unchanged():
    x = torch.empty(3, 4, device="meta")
    r = memtrace.report(make_model(), inputs=x, device="cpu")
    assert x.device.type == "meta" and x.shape == (3, 4) and not x.requires_grad
    assert r.peak_bytes == memtrace.report(make_model(), (3, 4), device="cpu").peak_bytes


def test_half_precision_request_does_not_cast_the_model():
    model = make_model()
    before = snapshot(model)
    memtrace.report(model, inputs=torch.zeros(3, 4, dtype=torch.bfloat16), device="cpu", dtype="bf16")
    assert_unchanged(model, before)
