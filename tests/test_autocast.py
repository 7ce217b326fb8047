"""AMP on the CUDA target follows CUDA's autocast lists (autocast_mode.h), not CPU's: exact bytes of the
forward's allocations for one small op each, against the CPU target where the two differ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memtrace
from memtrace import Phase, TraceError


class Head(nn.Module):
    """Linear(16, 32) on a [4, 16] input, then one op under test."""

    def __init__(self, then):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.then = then

    def forward(self, x):
        return self.then(self, self.fc(x))


def forward_allocations(then, device, amp):
    r = memtrace.report(Head(then), (4, 16), amp=amp, device=device, optimizer="sgd", steps=1)
    return [(a.op.removeprefix("aten.").removesuffix(".default"), a.requested_bytes) for a in r.allocations
            if a.phase is Phase.FORWARD and a.module != "(inputs)" and not a.op.startswith("cuBLAS")]


# The Linear's own allocations under AMP: casts of bias [32] (64 B), weight [32, 16] (1024 B) and input
# [4, 16] (128 B) to 16-bit, last argument first, and the 16-bit output [4, 32] (256 B).
LINEAR = [("_to_copy", 64), ("_to_copy", 1024), ("_to_copy", 128), ("addmm", 256)]


def test_layer_norm_runs_in_float32_on_cuda():
    ln = lambda m, y: m.ln(y)  # noqa: E731
    # CUDA: layer_norm is on the fp32 list: the 16-bit output is cast to float32 (4*32*4 B), normalised in
    # float32 (512 B), with float32 mean and rstd [4, 1] (16 B each)
    assert forward_allocations(ln, "cuda", "bf16")[:-1] == LINEAR + [
        ("_to_copy", 512), ("native_layer_norm", 512), ("native_layer_norm", 16), ("native_layer_norm", 16)]
    # CPU autocast has no rule for layer_norm: it runs in bf16 (256 B). (Its mean and rstd are bf16 on the
    # CPU, but PyTorch 2.5's fake kernel makes them float32.)
    assert forward_allocations(ln, "cpu", "bf16")[:5] == LINEAR + [("native_layer_norm", 256)]


@pytest.mark.parametrize("amp, expected", [
    # fp16: softmax gets dtype=float and CUDA's half-to-float kernel writes float32 directly (512 B)
    ("fp16", [("_softmax", 512)]),
    # bf16: no such kernel, the input is first cast to a float32 copy
    ("bf16", [("_to_copy", 512), ("_softmax", 512)]),
])
def test_softmax_runs_in_float32_on_cuda(amp, expected):
    allocs = forward_allocations(lambda m, y: torch.softmax(y, -1), "cuda", amp)
    assert allocs == LINEAR + expected + [("mean", 4)]


def test_sum_of_half_is_float32_on_cuda():
    # sum is fp32_set_opt_dtype: a float32 scalar (4 B) on CUDA, a bf16 one (2 B) under CPU autocast
    assert forward_allocations(lambda m, y: y.sum(), "cuda", "bf16") == LINEAR + [("sum", 4), ("mean", 4)]
    assert ("sum", 2) in forward_allocations(lambda m, y: y.sum(), "cpu", "bf16")


def test_cross_entropy_keeps_the_logits_dtype_on_cuda():
    def ce(m, y):
        return F.cross_entropy(y, torch.zeros(4, dtype=torch.long))

    # CUDA: cross_entropy has no rule; its log_softmax is asked for the logits' own dtype (16-bit, 256 B),
    # then nll_loss (fp32 list) casts those log-probabilities to float32 (512 B)
    assert forward_allocations(ce, "cuda", "fp16")[4:8] == [
        ("zeros", 32), ("_log_softmax", 256), ("_to_copy", 512), ("nll_loss_forward", 4)]
    # CPU autocast casts cross_entropy's input to float32 first and log-softmaxes in float32
    assert forward_allocations(ce, "cpu", "fp16")[4:8] == [
        ("zeros", 32), ("_to_copy", 512), ("_log_softmax", 512), ("nll_loss_forward", 4)]


def test_weights_are_cast_once_per_autocast_region():
    # fc is called twice: its weight and bias are cast once (cached), the input twice
    allocs = forward_allocations(lambda m, y: m.fc(m.fc.weight.new_ones(4, 16)) + y, "cuda", "fp16")
    assert allocs.count(("_to_copy", 1024)) == 1 and allocs.count(("_to_copy", 64)) == 1


def test_the_cache_dies_with_the_region():
    # two iterations: each forward casts the weight again, as the cache is cleared when autocast exits
    r = memtrace.report(Head(lambda m, y: y), (4, 16), amp="fp16", optimizer="sgd", steps=2)
    weight_casts = [a for a in r.allocations if a.op == "aten._to_copy.default" and a.requested_bytes == 1024]
    assert [a.iteration for a in weight_casts] == [0, 1]
    assert all(a.free_event is not None for a in weight_casts)


def test_binary_cross_entropy_is_refused_as_on_cuda():
    def bce(m, y):
        return F.binary_cross_entropy(torch.sigmoid(y), torch.zeros(4, 32))

    with pytest.raises(TraceError, match="unsafe to autocast"):
        memtrace.report(Head(bce), (4, 16), amp="fp16", optimizer="sgd")
    memtrace.report(Head(bce), (4, 16), amp="fp16", optimizer="sgd", device="cpu")  # CPU runs it


def test_cpu_autocast_is_left_as_it_was():
    memtrace.report(Head(lambda m, y: m.ln(y)), (4, 16), amp="bf16", optimizer="sgd")
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (32,)).dtype == torch.bfloat16
        assert F.cross_entropy(x, torch.zeros(4, dtype=torch.long)).dtype == torch.float32


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 256), nn.ReLU()) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_casts_made_while_checkpointing_recomputes_die_in_backward():
    # The recomputation enters autocast again; its exit drops the weight copies (256*256 fp16) it cast,
    # once the block's backward no longer holds them, within the same backward.
    r = memtrace.report(Blocks(), (8, 256), amp="fp16", optimizer="sgd", checkpoint="auto", steps=1)
    backward = next(p for p in r.timeline.phases if p.phase is Phase.BACKWARD)
    recast = [a for a in r.allocations if a.op == "aten._to_copy.default" and a.requested_bytes == 256 * 256 * 2
              and a.phase is Phase.BACKWARD]
    assert len(recast) == 4
    assert all(backward.start_event <= a.free_event < backward.end_event for a in recast)
