"""The buffers CPU convolutions allocate inside their kernels (oneDNN's reorders and scratchpad, PyTorch's
im2col columns) and the workspace oneDNN's recurrent layers keep for backward, read from the kernels
themselves (memtrace/cpu_kernels.py), against the real step under the profiler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace
from memtrace import cpu_kernels
from memtrace.measure import measure_cpu
from memtrace.options import Category

from tiny_models import make_cnn


def strided_and_depthwise() -> nn.Sequential:
    # a strided 3 x 3 on 3 channels (no input reorder), a depthwise 5 x 5, a strided 1 x 1 (oneDNN picks
    # another kernel for it at 12 images than at 3 to 5), then a head
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 5, padding=2, groups=16),
                         nn.Conv2d(16, 32, 1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


def one_dimensional() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.ConvTranspose1d(8, 4, 3), nn.Flatten())


@pytest.mark.parametrize("build,shape,kwargs", [
    # 4 channels at 16 x 16: the convolutions' buffers reach the peak (10-28 % of it before they were read)
    pytest.param(lambda: make_cnn(channels=4, hw=16), (8, 3, 16, 16), dict(optimizer="sgd"), id="small-cnn"),
    pytest.param(lambda: make_cnn(channels=4, hw=16), (8, 3, 16, 16), dict(optimizer="adam"), id="small-cnn-adam"),
    pytest.param(strided_and_depthwise, (12, 3, 32, 32), dict(optimizer="sgd"), id="strided-depthwise"),
    pytest.param(lambda: strided_and_depthwise().to(memory_format=torch.channels_last), (12, 3, 32, 32),
                 dict(optimizer="sgd"), id="channels-last"),
    # no gradient wanted: oneDNN's forward-inference kernels, with other buffers
    pytest.param(strided_and_depthwise, (12, 3, 32, 32), dict(train=False), id="inference"),
    pytest.param(one_dimensional, (9, 4, 50), dict(optimizer="sgd"), id="conv1d-transposed"),
])
def test_convolution_buffers_to_the_byte(build, shape, kwargs):
    predicted = memtrace.report(build(), shape, device="cpu", **kwargs)
    measured = measure_cpu(build(), shape, **kwargs)
    assert predicted.peak_bytes == measured.peak_bytes
    assert any(n.startswith("CPU convolutions: the buffers") for n in predicted.notes)


def test_buffers_are_workspaces_of_the_convolution():
    r = memtrace.report(strided_and_depthwise(), (12, 3, 32, 32), optimizer="sgd", device="cpu")
    buffers = [a for a in r.allocations if a.op == cpu_kernels.LABEL]
    assert buffers and all(a.category is Category.WORKSPACE and a.free_event is not None for a in buffers)
    # the strided 1 x 1's backward reorders its input (12 x 16 x 16 x 16 float32) for the weight gradient
    assert 12 * 16 * 16 * 16 * 4 in {a.requested_bytes for a in buffers}
    cuda = memtrace.report(strided_and_depthwise(), (12, 3, 32, 32), optimizer="sgd", device="cuda")
    assert not any(n.startswith("CPU convolutions") for n in cuda.notes)
    assert not any(a.op == cpu_kernels.LABEL for a in cuda.allocations)


def test_a_convolution_whose_kernel_cannot_run_is_said(monkeypatch):
    read = memtrace.report(strided_and_depthwise(), (12, 3, 32, 32), optimizer="sgd", device="cpu")
    monkeypatch.setattr(cpu_kernels, "_RUNS", {})
    monkeypatch.setattr(cpu_kernels, "_run", lambda func, signature, threads: None)
    unread = memtrace.report(strided_and_depthwise(), (12, 3, 32, 32), optimizer="sgd", device="cpu")
    assert unread.notes.count(cpu_kernels.UNREAD_NOTE) == 1
    assert not any(n.startswith("CPU convolutions: the buffers") for n in unread.notes)
    assert unread.peak_bytes < read.peak_bytes


def test_kernels_are_run_once_per_distinct_convolution(monkeypatch):
    runs = []
    real = cpu_kernels._run
    monkeypatch.setattr(cpu_kernels, "_RUNS", {})
    monkeypatch.setattr(cpu_kernels, "_run", lambda *a: runs.append(a[0]) or real(*a))
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    memtrace.report(model, (4, 8, 16, 16), optimizer="sgd", device="cpu", steps=2)
    # the first convolution's input needs no gradient, the others' do: two forward kernels, two backward
    assert sorted(f.__name__ for f in runs) == ["convolution.default", "convolution.default",
                                                "convolution_backward.default", "convolution_backward.default"]


def test_a_convolution_too_large_to_run_is_said(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_RUNS", {})
    monkeypatch.setattr(cpu_kernels, "MAX_MACS", 0)
    r = memtrace.report(strided_and_depthwise(), (12, 3, 32, 32), optimizer="sgd", device="cpu")
    assert cpu_kernels.TOO_LARGE_NOTE in r.notes
    measured = measure_cpu(strided_and_depthwise(), (12, 3, 32, 32), optimizer="sgd")
    assert r.peak_bytes < measured.peak_bytes


class Recurrent(nn.Module):
    def __init__(self, cls=nn.LSTM, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cls(16, 32, batch_first=True, **kwargs)
        self.head = nn.Linear(64 if kwargs.get("bidirectional") else 32, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("build", [
    pytest.param(lambda: Recurrent(num_layers=2), id="lstm-2-layers"),
    pytest.param(lambda: Recurrent(num_layers=2, bidirectional=True), id="lstm-bidirectional"),
    pytest.param(lambda: Recurrent(nn.GRU), id="gru"),  # not oneDNN's: nothing to read, already exact
])
def test_recurrent_workspace_to_the_byte(build):
    predicted = memtrace.report(build(), (4, 10, 16), optimizer="sgd", device="cpu")
    measured = measure_cpu(build(), (4, 10, 16), optimizer="sgd")
    assert predicted.peak_bytes == measured.peak_bytes


def test_recurrent_workspace_is_kept_for_backward():
    r = memtrace.report(Recurrent(num_layers=2), (4, 10, 16), optimizer="sgd", device="cpu", steps=1)
    assert cpu_kernels.RNN_NOTE in r.notes
    # each layer's forward outputs: its output (4 x 10 x 32 float32, 5,120 B), h and c, and the workspace,
    # larger than the output, an activation freed in backward
    made = [a for a in r.allocations if a.op == "aten.mkldnn_rnn_layer.default"]
    workspaces = [a for a in made if a.requested_bytes > 4 * 10 * 32 * 4]
    assert len(made) == 8 and len(workspaces) == 2
    assert all(a.category is Category.ACTIVATION and a.free_event is not None for a in workspaces)
    backward_starts = min(a.alloc_event for a in r.allocations if a.phase.value == "backward")
    assert all(a.free_event > backward_starts for a in workspaces)
