"""device="cuda" predictions against torch.cuda.max_memory_allocated() of the real step.

The GPU checks run only where CUDA is available; without it, measuring must fail with a clear message.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace

from tiny_models import EvenExperts, NormBlock

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


NORM_CASES = {
    "layer-norm-bf16": (lambda: nn.LayerNorm(2048), dict(dtype=torch.bfloat16)),  # float32 mean and rstd
    "rms-norm-fp32": (lambda: nn.RMSNorm(2048), {}),  # fused from PyTorch 2.9: no normalised copy kept
    "rms-norm-bf16": (lambda: nn.RMSNorm(2048), dict(dtype=torch.bfloat16)),
    "rms-norm-amp": (lambda: nn.RMSNorm(2048), dict(amp="bf16")),
}


@needs_gpu
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_blocks_match_max_memory_allocated(case):
    make, kwargs = NORM_CASES[case]
    # [8, 1024, 2048]: the norm's kept tensors are 64 MiB each in float32
    r = memtrace.report(NormBlock(make(), 2048), (8, 1024, 2048), optimizer="adamw", verify=True, **kwargs)
    assert abs(r.error_percent) <= 2.0, (r.peak_bytes, r.measured.peak_bytes)


@needs_gpu
@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is new in PyTorch 2.8")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_max_memory_allocated(dtype):
    # float32 runs PyTorch's fallback loop of mm, bf16 the grouped kernel on sm90/sm100
    r = memtrace.report(EvenExperts(), (8192, 2048), optimizer="adamw", dtype=dtype, verify=True)
    assert abs(r.error_percent) <= 2.0, (r.peak_bytes, r.measured.peak_bytes)
