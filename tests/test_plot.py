"""The picture of the step: the stacked data (no matplotlib needed), its downsampling, and the drawn file."""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memtrace
from memtrace import Category
from memtrace.plot import STACK_ORDER, StackedBytes, downsample, stacked_bytes

from tiny_models import make_cnn, tiny_gpt2, token_batch

CNN = make_cnn()


@pytest.fixture(scope="module", params=["cuda", "cpu"])
def cnn_report(request):
    return memtrace.report(CNN, (4, 3, 32, 32), optimizer="adam", device=request.param)


def totals(stacked: StackedBytes) -> list[int]:
    return [stacked.total(e) for e in range(len(stacked.ops))]


def test_the_stack_tops_out_at_the_timeline_and_the_peak(cnn_report):
    r = cnn_report
    stacked = stacked_bytes(r)
    assert tuple(stacked.by_category) == STACK_ORDER
    assert totals(stacked) == list(r.timeline.allocated_bytes)
    assert max(totals(stacked)) == r.peak_bytes
    # at the peak event the stack is the report's breakdown, category by category
    assert {c: col[r.peak.event] for c, col in stacked.by_category.items()} == dict(r.by_category)
    assert all(v >= 0 for col in stacked.by_category.values() for v in col)


def test_parameters_stay_stacked_once_allocated(cnn_report):
    params = stacked_bytes(cnn_report).by_category[Category.PARAMETER]
    assert params[-1] == cnn_report.by_category[Category.PARAMETER]
    assert list(params) == sorted(params)  # parameters are never freed during the step


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 10**9), min_size=1, max_size=3000), max_points=st.integers(2, 500))
def test_downsampling_keeps_the_peak_and_the_ends(values, max_points):
    stacked = StackedBytes(tuple(range(len(values))), {Category.ACTIVATION: tuple(values)})
    kept = downsample(stacked, max_points)
    assert kept == sorted(set(kept))
    assert max(values) in [values[k] for k in kept]
    assert kept[-1] == len(values) - 1
    if len(values) <= max_points:
        assert kept == list(range(len(values)))
    else:
        assert len(kept) <= max_points + 1
        assert min(values) in [values[k] for k in kept]


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_a_png_of_the_asked_size(cnn_report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "step.png"
    cnn_report.plot(path, figsize=(10, 4), dpi=100)
    assert png_size(path) == (1000, 400)
    assert path.stat().st_size > 20_000  # a drawn chart, not an empty canvas (a blank one is ~3 KB)


def test_plot_leaves_pyplot_alone(cnn_report, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    cnn_report.plot(tmp_path / "step.svg")
    assert (tmp_path / "step.svg").read_text().lstrip().startswith("<?xml")
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures


def test_plot_draws_a_long_llm_timeline_downsampled(tmp_path):
    pytest.importorskip("matplotlib")
    r = memtrace.report(tiny_gpt2(), inputs=token_batch(), optimizer="adamw", steps=3)
    assert len(r.timeline.allocated_bytes) > 500
    path = tmp_path / "gpt2.png"
    r.plot(path, max_points=200, title="tiny GPT-2")
    assert png_size(path) == (1320, 605)  # the default 12 x 5.5 in at 110 dpi
    assert path.stat().st_size > 20_000


def test_plot_without_matplotlib_says_how_to_get_it(cnn_report, tmp_path, monkeypatch):
    for name in ["matplotlib"] + [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled package looks like to import
    path = tmp_path / "step.png"
    with pytest.raises(ImportError, match=r"pip install memtrace\[plot\]"):
        cnn_report.plot(path)
    assert not path.exists()
