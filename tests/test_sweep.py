"""Reports replayed from the traces at two batch sizes (``memtrace.sweep``) against traces at the same batch
sizes: equal field for field (byte for byte in JSON) where the traces line up, refused where they do not, and
the answers built on them the same as the answers from traces alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import memtrace
from memtrace.planning import Batched, Estimates, MemoryLimit, search
from memtrace.sweep import Line, NoLine, trace_step
from tiny_models import make_cnn, make_mlp, tiny_gpt2, tiny_llama

CUDA = {"gpu": "H100"}


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available()


def _estimates(model, input_shape=None, inputs=None, **options) -> Estimates:
    return Estimates(model, Batched(input_shape=input_shape, inputs=inputs), options, replay=False)


def _traced(est: Estimates, batch: int):
    return trace_step(est.model, est.eager, est._options(batch))


def _replayed(line: Line, est: Estimates, batch: int):
    traced = line.at(batch, est._options(batch))
    return None if traced is None else traced.report()


def _same(replayed, direct) -> None:
    assert replayed is not None
    assert replayed == direct
    assert replayed.to_json() == direct.to_json()


class BiasColumns(nn.Module):
    """A wide Linear over many rows: its bias gradient is a column sum that CUDA's reduction splits across
    blocks, with scratch whose size is not affine in the batch, above some number of rows only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 256)

    def forward(self, x):
        return self.fc(x).sum(dim=-1)


_MODELS = {
    "mlp": (make_mlp, {"input_shape": (3, 4)}),
    "cnn": (make_cnn, {"input_shape": (2, 3, 32, 32)}),
    "bias": (BiasColumns, {"input_shape": (4, 64, 32)}),
}


@pytest.fixture(scope="module")
def lines():
    """Per (model, options): the estimates, and the line through the traces at batches 3 and 5."""
    made = {}
    with pytest.MonkeyPatch.context() as env:  # as conftest sets it for each test, where the replays are made
        env.setenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1")
        for name, (factory, kwargs) in _MODELS.items():
            for device, options in (("cuda", {**CUDA, "optimizer": "adamw"}), ("cpu", {"device": "cpu"})):
                est = _estimates(factory(), **kwargs, **options)
                made[name, device] = est, Line(_traced(est, 3), 3, _traced(est, 5), 5)
    return made


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(_MODELS)), device=st.sampled_from(["cuda", "cpu"]),
       batch=st.integers(1, 600))
def test_replays_equal_traces(lines, name, device, batch):
    est, line = lines[name, device]
    _same(_replayed(line, est, batch), _traced(est, batch).report())


def test_a_reductions_scratch_is_sized_again_at_each_batch():
    # the bias gradient's column sum over 4 x 64 rows takes no scratch on an H100; over 2048 x 64 rows it is
    # split across blocks: the replay from batches 4 and 5 makes the scratch where the trace does
    est = _estimates(BiasColumns(), input_shape=(4, 64, 32), **CUDA)
    small, big = _traced(est, 4).report(), _traced(est, 2048).report()
    scratch = [a.op for a in big.allocations if a.op.startswith("reduction")]
    assert scratch and not [a for a in small.allocations if a.op.startswith("reduction")]
    line = Line(_traced(est, 4), 4, _traced(est, 5), 5)
    _same(_replayed(line, est, 2048), big)


def test_a_token_models_replays_equal_its_traces_and_batch_one_is_its_own():
    model = tiny_llama()
    ids = torch.zeros(2, 32, dtype=torch.long)
    est = _estimates(model, inputs={"input_ids": ids, "labels": ids}, amp="bf16", **CUDA)
    line = Line(_traced(est, 2), 2, _traced(est, 3), 3)
    for batch in (7, 40):
        _same(_replayed(line, est, batch), _traced(est, batch).report())
    # at batch 1 the model runs other ops (size-1 dimensions make other layouts contiguous): the line does
    # not hold there, and the estimates see it from the trace
    one = _traced(est, 1).report()
    assert one.traced_ops != est.reports.get(2, _traced(est, 2).report()).traced_ops
    assert _replayed(line, est, 1) != one
    replaying = Estimates(model, Batched(inputs={"input_ids": ids, "labels": ids}), {"amp": "bf16", **CUDA})
    replaying(2), replaying(3), replaying(1)
    assert replaying.regimes[0].low == 1 and replaying.peak(9) == _traced(est, 9).report().peak_bytes


def test_another_gpu_of_the_same_kind_is_replayed_with_its_own_sizes():
    # an A100 and an A5000 make the same choices; their reductions' scratch differs (SM counts 108 and 64)
    model = BiasColumns()
    a100 = _estimates(model, input_shape=(4, 64, 32), gpu="A100-80GB")
    a5000 = _estimates(model, input_shape=(4, 64, 32), gpu="A5000")
    line = Line(_traced(a100, 300), 300, _traced(a100, 301), 301)
    direct = _traced(a5000, 700).report()

    def scratch(r):
        return [a.requested_bytes for a in r.allocations if a.op.startswith("reduction")]
    assert scratch(direct) and scratch(direct) != scratch(_traced(a100, 700).report())
    _same(_replayed(line, a5000, 700), direct)


class Branchy(nn.Module):
    """Runs another op above batch 6: the traces at 2 and 3 line up, and their line is wrong above 6."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        if x.shape[0] > 6:
            y = y * torch.sigmoid(y)
        return y


def test_steps_that_change_with_the_batch_do_not_line_up():
    est = _estimates(Branchy(), input_shape=(2, 8), **CUDA)
    with pytest.raises(NoLine, match="differ"):
        Line(_traced(est, 2), 2, _traced(est, 9), 9)
    est = _estimates(make_mlp(), input_shape=(2, 4), **CUDA)
    with pytest.raises(ValueError):
        Line(_traced(est, 2), 2, _traced(est, 2), 2)


def test_a_line_stops_where_a_trace_contradicts_it():
    # lined up at 2 and 3, contradicted at 9: replays hold below 9 only, and the answer is the same as from
    # traces alone
    model, limit = Branchy(), MemoryLimit(2 * 2**20)
    replaying = Estimates(model, Batched(input_shape=(2, 8)), {"device": "cpu"})
    replaying(2), replaying(3)
    assert len(replaying.regimes) == 1 and replaying.peak(5) == _traced(replaying, 5).report().peak_bytes
    replaying(9)
    assert replaying.regimes[0].high == 9 and replaying._regime(12) is None
    traced = Estimates(model, Batched(input_shape=(2, 8)), {"device": "cpu"}, replay=False)
    a, b = search(replaying, limit, 2, cap=4096), search(traced, limit, 2, cap=4096)
    assert (a.batch_size, a.report, a.next_report) == (b.batch_size, b.report, b.next_report)


@pytest.mark.parametrize("factory,kwargs,limit", [
    (make_cnn, {"input_shape": (8, 3, 32, 32)}, "90 MiB"),
    (tiny_gpt2, {"inputs": {"input_ids": torch.zeros(2, 32, dtype=torch.long),
                            "labels": torch.zeros(2, 32, dtype=torch.long)}}, "150 MiB"),
    (Branchy, {"input_shape": (2, 8)}, "80 MiB"),
])
def test_max_batch_size_is_the_same_with_replays(factory, kwargs, limit):
    model = factory()
    batched = Batched(**kwargs)
    mem = memtrace.memory_limit(limit)
    with_replays = search(Estimates(model, batched, CUDA), mem, batched.batch_size, cap=4096)
    traces_only = search(Estimates(model, batched, CUDA, replay=False), mem, batched.batch_size, cap=4096)
    assert with_replays.batch_size == traces_only.batch_size > 1
    assert with_replays.report == traces_only.report and with_replays.next_report == traces_only.next_report
    assert with_replays.estimates <= traces_only.estimates
    # every peak the search saw is the traced one
    for b, peak in with_replays.peaks.items():
        assert peak == memtrace.report(model, **batched.at(b), **CUDA).peak_bytes


@pytest.mark.skipif(not _has_fsdp2(), reason="parallel= needs PyTorch 2.6 or later")
def test_sharded_traces_line_up():
    model = tiny_llama()
    ids = torch.zeros(1, 32, dtype=torch.long)
    est = _estimates(model, inputs={"input_ids": ids, "labels": ids}, parallel={"fsdp": 2}, amp="bf16", **CUDA)
    line = Line(_traced(est, 2), 2, _traced(est, 3), 3)
    _same(_replayed(line, est, 6), _traced(est, 6).report())


def test_progress_says_each_trace_and_clears_its_line():
    import io

    from memtrace.planning import progress

    stream = io.StringIO()
    with progress(stream) as shown:
        result = memtrace.max_batch_size(make_mlp(), input_shape=(4, 4), limit="70 MiB", **CUDA)
    text = stream.getvalue()
    assert shown.traced == result.estimates and text.count("memtrace: tracing batch") == result.estimates
    assert "for H100" in text and text.endswith("\r\x1b[K")
