"""device="cuda" predictions against torch.cuda.max_memory_allocated() of the real step.

The GPU checks run only where CUDA is available; without it, measuring must fail with a clear message.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_measuring_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU, and torch.cuda.is_available\(\) is False"):
        memtrace.measure(mlp(), (64, 512))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        memtrace.report(mlp(), (64, 512), verify=True)


@needs_gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mlp_matches_max_memory_allocated(optimizer):
    r = memtrace.report(mlp(), (64, 512), optimizer=optimizer, verify=True)
    assert r.measured.device == "cuda"
    assert abs(r.error_percent) <= 2.0, (r.peak_bytes, r.measured.peak_bytes)


@needs_gpu
def test_measure_leaves_no_memory_behind():
    before = torch.cuda.memory_allocated()
    memtrace.measure(mlp(), (64, 512), optimizer="adam")
    assert torch.cuda.memory_allocated() == before
