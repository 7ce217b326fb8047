"""The ``--update-golden`` flag (tests/golden/*); shared tiny models live in tiny_models.py."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/* from the current output instead of comparing")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture(autouse=True)
def _cublaslt_in_the_cublas_workspace(monkeypatch):
    """cuBLASLt's own workspace (1 MiB, kept by PyTorch 2.9-2.11 only) has its own tests, which clear this;
    elsewhere the expected bytes are those of releases where cuBLASLt runs in cuBLAS's workspace, so they
    hold on every PyTorch version."""
    monkeypatch.setenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1")
