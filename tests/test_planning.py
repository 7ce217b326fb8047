"""Planning answers (largest batch, what fits where, what-if, levers, epochs) against memtrace's own reports."""

from __future__ import annotations

import math
from types import MappingProxyType

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn import functional as F

import memtrace
from memtrace.options import Category, Phase, repeated_blocks
from memtrace.planning import MemoryLimit, search
from tiny_models import make_cnn, make_mlp, token_batch, tiny_gpt2


class Block(nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def deep_model(depth: int = 6, d: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, d), nn.Sequential(*[Block(d) for _ in range(depth)]), nn.Linear(d, 4))


@pytest.fixture
def count_reports(monkeypatch):
    """The steps traced (by memtrace.report and by the planning answers)."""
    import memtrace.sweep

    calls = []
    real = memtrace.sweep.trace_step

    def counting(model, eager, options):
        calls.append(options.inputs)
        return real(model, eager, options)

    monkeypatch.setattr(memtrace.sweep, "trace_step", counting)
    return calls


# ---- largest batch ---------------------------------------------------------------------------------------

def test_max_batch_fits_and_the_next_does_not(count_reports):
    model = make_cnn()
    limit = 72 * 2**20  # above the two cuBLAS workspaces and the model, so the batch decides
    result = memtrace.max_batch_size(model, input_shape=(64, 3, 32, 32), limit=limit, optimizer="sgd")
    b = result.batch_size
    assert b > 1 and not result.capped
    at, after = (memtrace.report(model, (n, 3, 32, 32), optimizer="sgd").peak_bytes for n in (b, b + 1))
    assert at <= limit < after
    assert result.report.peak_bytes == at and result.next_report.peak_bytes == after
    assert result.headroom_bytes == limit - at
    # close to affine here (the reductions' scratch is not quite): the given batch, the answer its split
    # predicts, the one after it, and at most one more
    assert result.estimates == len(count_reports) - 2 <= 4
    assert {b, b + 1, 64} <= set(result.peaks)
    assert result.to_dict()["batch_size"] == b and str(b) in result.table()


def test_max_batch_varies_every_input_of_a_token_model():
    model = tiny_gpt2()
    result = memtrace.max_batch_size(model, inputs=token_batch(), limit="100 MiB")
    b = result.batch_size
    assert b > 2
    assert [i["shape"] for i in result.report.settings["inputs"]] == [[b, 32], [b, 32]]
    assert [i["shape"] for i in result.next_report.settings["inputs"]] == [[b + 1, 32], [b + 1, 32]]
    assert result.report.peak_bytes <= 100 * 2**20 < result.next_report.peak_bytes
    assert result.estimates <= 4


def test_batch_one_that_does_not_fit_is_said():
    result = memtrace.max_batch_size(make_mlp(), (4,), limit="1 MiB")
    assert result.batch_size == 0 and not result.fits and result.report is None
    assert result.next_report.settings["inputs"][0]["shape"] == [1, 4]
    assert result.next_report.peak_bytes > 2**20
    assert "Even batch 1 does not fit" in result.table()


def test_huge_answers_stop_at_the_cap():
    result = memtrace.max_batch_size(make_mlp(), (4,), limit="10 GiB", cap=5000)
    assert result.capped and result.batch_size == 5000 and result.next_report is None
    assert result.report.peak_bytes <= 10 * 2**30
    assert result.estimates == 2  # the start, then the cap
    assert "at least 5000" in result.table()


def test_a_card_not_in_the_catalog_can_be_described():
    # a 48 GB sm86 card described by the caller: its capability decides the workspace and kernels, its
    # memory the limit
    a40 = memtrace.GPU("A40", 45 * 2**30, (8, 6))
    r = memtrace.report(make_mlp(), (3, 4), gpu=a40, optimizer="sgd")
    assert r.settings["gpu"] == "A40"
    assert r.peak_bytes == memtrace.report(make_mlp(), (3, 4), gpu="A5000", optimizer="sgd").peak_bytes  # sm86 too
    assert memtrace.memory_limit(gpu=a40).limit_bytes == int((45 * 2**30 - 2**30) * 0.95)


def test_gpu_limit_is_the_cards_usable_memory():
    card = memtrace.GPUS["a5000"]
    mem = memtrace.memory_limit(gpu="A5000")
    assert mem.limit_bytes == card.usable_bytes() and mem.gpu == "A5000"
    assert memtrace.memory_limit(gpu="A5000", context_bytes="2 GiB", fragmentation=0.1).limit_bytes == \
        int((24_114 * 2**20 - 2 * 2**30) * 0.9)  # the 24,114 MiB PyTorch reports on an A5000
    assert memtrace.memory_limit(limit="24GB").limit_bytes == 24 * 10**9
    result = memtrace.max_batch_size(make_mlp(), (4,), gpu="T4", cap=64)
    assert result.report.settings["gpu"] == "T4" and result.limit.gpu == "T4"
    with pytest.raises(ValueError, match="limit="):
        memtrace.max_batch_size(make_mlp(), (4,), device="cpu")


class _Peaks:
    """A stand-in for Estimates whose peak is any function of the batch."""

    def __init__(self, peak_of):
        self.peak_of = peak_of
        self.reports = {}
        self.replays = {}

    def peak(self, b):
        return self(b).peak_bytes

    def settled(self, b, trust):
        return self(b)

    def __call__(self, b):
        if b not in self.reports:
            peak = self.peak_of(b)
            fixed = self.peak_of(0)
            by = {c: 0 for c in Category}
            by[Category.PARAMETER], by[Category.ACTIVATION] = fixed, peak - fixed
            self.reports[b] = type("R", (), {"peak_bytes": peak, "by_category": MappingProxyType(by)})()
        return self.reports[b]


@settings(max_examples=60, deadline=None)
@given(fixed=st.integers(0, 10**6), slope=st.integers(1, 10**4), jump_at=st.integers(1, 3000),
       jump=st.integers(0, 10**6), curve=st.integers(0, 50), start=st.integers(1, 500),
       limit=st.integers(1, 10**8))
def test_search_is_right_when_memory_is_not_affine(fixed, slope, jump_at, jump, curve, start, limit):
    # a step in memory (a new allocator segment, the peak moving to another phase) and a convex term
    def peak(b):
        return fixed + slope * b + (jump if b >= jump_at else 0) + curve * b * b // 100

    est = _Peaks(peak)
    result = search(est, MemoryLimit(limit), start, cap=4096)
    b = result.batch_size
    if b:
        assert peak(b) <= limit
    if not result.capped:
        assert peak(b + 1) > limit
    else:
        assert b == 4096
    assert result.estimates == len(est.reports) <= 3 + 6 + 2 * math.ceil(math.log2(4096)) + 2


# ---- what fits where ---------------------------------------------------------------------------------------

def test_fits_table_rows_match_single_estimates():
    model = make_cnn()
    table = memtrace.fits(model, input_shape=(64, 3, 32, 32), gpus=["H100", "T4", "A5000", "RTX 4090"],
                          optimizer="sgd", cap=4096)
    assert [r.gpu for r in table.rows] == ["H100", "T4", "A5000", "RTX 4090"]
    for row in table.rows:
        single = memtrace.report(model, (64, 3, 32, 32), optimizer="sgd", gpu=row.gpu)
        assert row.peak_bytes == single.peak_bytes
        assert row.usable_bytes == memtrace.GPUS[row.gpu.lower().replace(" ", "")].usable_bytes()
        assert row.fits == (single.peak_bytes <= row.usable_bytes)
        assert row.largest.batch_size == memtrace.max_batch_size(
            model, (3, 32, 32), gpu=row.gpu, optimizer="sgd", cap=4096).batch_size
    # A5000 and RTX 4090 (sm86, sm89) make the same choices: the traces of one replay the other's step
    assert table.replays > 0 and table.estimates < 2 * len(table.rows) + 4
    for row in table.rows:
        for b, peak in row.largest.peaks.items():
            assert peak == memtrace.report(model, (b, 3, 32, 32), optimizer="sgd", gpu=row.gpu).peak_bytes
    assert "Largest batch" in table.table() and len(table.to_dict()["rows"]) == 4


def test_cards_that_share_lines_predict_the_same():
    # fits() replays one card's traces for every card with the same attention kernels and cuBLAS
    # workspace (sizing the reductions' scratch for each); where those cards run the same reductions
    # without scratch, they predict the same: if the CUDA target starts using more of a card, this catches it
    from memtrace.gpufit import _behaviour

    model = tiny_gpt2()
    for a, b, attention in (("H100", "B200", True), ("A5000", "L4", True), ("V100-32GB", "T4", False)):
        ca, cb = memtrace.GPUS[a.lower().replace("-", "")], memtrace.GPUS[b.lower()]
        assert _behaviour(ca, attention) == _behaviour(cb, attention)
        ra, rb = (memtrace.report(model, inputs=token_batch(), amp="bf16", gpu=g) for g in (a, b))
        assert ra.peak_bytes == rb.peak_bytes and dict(ra.by_category) == dict(rb.by_category)
        assert [x.charged_bytes for x in ra.allocations] == [x.charged_bytes for x in rb.allocations]


def test_fits_splits_cards_whose_attention_kernels_differ():
    # fp16 attention with a mask and head dim 128 runs the memory-efficient kernel; an A100 (163 KiB of
    # shared memory per block) and an RTX 4090 (99 KiB) launch different ones, so they may not share
    from test_cuda_rules import Attention

    model = Attention(2, 128, mask=True)
    table = memtrace.fits(model, input_shape=(2, 256, 256), gpus=["A100-80GB", "RTX 4090"], amp="fp16",
                          optimizer="sgd", cap=64)
    singles = [memtrace.report(model, (2, 256, 256), amp="fp16", optimizer="sgd", gpu=g).peak_bytes
               for g in ("A100-80GB", "RTX 4090")]
    assert [r.peak_bytes for r in table.rows] == singles and singles[0] != singles[1]


# ---- what-if ------------------------------------------------------------------------------------------------

def test_compare_rows_equal_individual_reports():
    model = deep_model()
    shape = (256, 16)
    result = memtrace.compare(model, shape, variants=["fp32", "bf16", "sgd", "checkpoint",
                                                      {"label": "momentum", "optimizer": "sgd",
                                                       "optimizer_kwargs": {"momentum": 0.9}}])
    singles = [memtrace.report(model, shape), memtrace.report(model, shape, amp="bf16"),
               memtrace.report(model, shape, optimizer="sgd"), memtrace.report(model, shape, checkpoint="auto"),
               memtrace.report(model, shape, optimizer="sgd", optimizer_kwargs={"momentum": 0.9})]
    assert [r.label for r in result.rows] == ["fp32", "bf16", "sgd", "checkpoint", "momentum"]
    for row, single in zip(result.rows, singles):
        assert row.peak_bytes == single.peak_bytes
        assert dict(row.report.by_category) == dict(single.by_category)
        assert row.delta_bytes == single.peak_bytes - singles[0].peak_bytes
    sgd = result.rows[2]  # plain SGD keeps no state: that is what moved
    assert (Category.OPTIMIZER_STATE, -singles[0].by_category[Category.OPTIMIZER_STATE]) in sgd.moved
    assert "momentum" in result.table() and result.to_dict()["rows"][0]["delta_bytes"] == 0


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="'bf16'"):
        memtrace.compare(make_mlp(), (2, 4), variants=["fp8"])


def test_checkpointing_lowers_activations_and_raises_nothing_else():
    model = deep_model(depth=8)
    assert repeated_blocks(model) == tuple(f"1.{i}" for i in range(8))
    shape = (2048, 16)
    plain, ckpt = memtrace.report(model, shape), memtrace.report(model, shape, checkpoint="auto")
    assert ckpt.settings["checkpoint"] == [f"1.{i}" for i in range(8)]
    assert ckpt.peak_bytes < plain.peak_bytes
    assert ckpt.peak.phase is plain.peak.phase is Phase.BACKWARD
    assert ckpt.by_category[Category.ACTIVATION] < plain.by_category[Category.ACTIVATION]
    for c in (Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE, Category.BUFFER, Category.INPUT,
              Category.WORKSPACE, Category.TEMPORARY):
        assert ckpt.by_category[c] <= plain.by_category[c], c
    for a, b in zip(plain.layers, ckpt.layers):  # per-layer rows: same model state, less saved in forward
        assert (a.name, a.params, a.param_bytes, a.gradient_bytes, a.optimizer_state_bytes) == \
            (b.name, b.params, b.param_bytes, b.gradient_bytes, b.optimizer_state_bytes)
    block_in = 2048 * 64 * 4  # what a checkpointed block keeps from forward: its input, 2048 x 64 floats
    assert ckpt.layer("1").activation_bytes == 8 * block_in < plain.layer("1").activation_bytes
    # backward recomputes each block: the recomputation's saved tensors are activations again, in backward
    assert any(a.category is Category.ACTIVATION and a.phase is Phase.BACKWARD for a in ckpt.allocations)


def test_checkpointing_keeps_the_cpu_generator_state_on_the_cpu():
    # preserve_rng_state: each checkpointed block keeps torch.get_rng_state() from its forward until it is
    # recomputed, and the recomputation takes one more while it runs; memory of the device on a CPU run,
    # host memory on a GPU
    model, shape = deep_model(depth=3), (64, 16)
    state = torch.get_rng_state().untyped_storage().nbytes()
    cpu = memtrace.report(model, shape, device="cpu", checkpoint="auto", steps=1)
    kept = [a for a in cpu.allocations if a.op == "torch.get_rng_state"]
    assert [(a.requested_bytes, a.phase) for a in kept] == [(state, Phase.FORWARD)] * 3 + [(state, Phase.BACKWARD)] * 3
    assert all(a.category is Category.ACTIVATION and a.free_event is not None for a in kept)
    cuda = memtrace.report(model, shape, checkpoint="auto", steps=1)
    assert not [a for a in cuda.allocations if a.op == "torch.get_rng_state"]


def test_checkpoint_names_and_errors():
    model = deep_model(depth=3)
    r = memtrace.report(model, (64, 16), checkpoint=["1.0", "1.2"])
    assert r.settings["checkpoint"] == ["1.0", "1.2"]
    with pytest.raises(ValueError, match="not a submodule"):
        memtrace.report(model, (64, 16), checkpoint=["1.9"])
    with pytest.raises(ValueError, match="no repeated blocks"):
        memtrace.report(make_mlp(), (2, 4), checkpoint="auto")


def test_checkpointing_a_hugging_face_model():
    model = tiny_gpt2()
    plain = memtrace.report(model, inputs=token_batch())
    ckpt = memtrace.report(model, inputs=token_batch(), checkpoint="auto")
    assert ckpt.settings["checkpoint"] == ["transformer.h.0", "transformer.h.1"]
    assert ckpt.layer("transformer.h").activation_bytes < plain.layer("transformer.h").activation_bytes


# ---- levers ---------------------------------------------------------------------------------------------------

def test_levers_each_come_from_an_estimate():
    model = deep_model(depth=4)
    shape = (2048, 16)
    base = memtrace.report(model, shape)
    limit = base.peak_bytes - 2**20
    result = memtrace.levers(model, shape, limit=limit)
    assert not result.fits and result.base.peak_bytes == base.peak_bytes
    by_label = {lv.label: lv for lv in result.levers}
    assert {"AMP fp16", "AMP bf16", "SGD (no optimizer state)", "activation checkpointing"} <= set(by_label)
    for lv in result.levers:
        assert lv.saves_bytes == base.peak_bytes - lv.report.peak_bytes
        assert lv.fits == (lv.report.peak_bytes <= limit)
    assert by_label["activation checkpointing"].report.peak_bytes == \
        memtrace.report(model, shape, checkpoint="auto").peak_bytes
    smaller = result.levers[0]
    b = result.largest.batch_size
    assert smaller.label == f"batch 2048 → {b}" and smaller.fits and 0 < b < 2048
    # gradient accumulation keeping the batch, estimated with the accumulated gradients live
    accumulated = result.levers[1]
    k = accumulated.overrides["accumulation_steps"]
    micro = accumulated.overrides["batch_size"]
    assert accumulated.label == f"{k} × {micro} (gradient accumulation)" and k * micro >= 2048 and micro <= b
    assert accumulated.report.peak_bytes == memtrace.report(model, (micro, 16), accumulation_steps=k).peak_bytes
    assert memtrace.report(model, (b + 1, 16)).peak_bytes > limit
    assert "Does not fit" in result.table() and result.to_dict()["max_batch_size"] == b


class NoAutocast(nn.Module):
    """A model whose step fails under AMP (as one with an op autocast cannot run would)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("this model does not run under autocast")
        return self.fc(x)


def test_a_lever_whose_step_fails_is_listed_not_fatal():
    model = NoAutocast()
    limit = memtrace.report(model, (4096, 16)).peak_bytes - 2**16
    result = memtrace.levers(model, (4096, 16), limit=limit)
    labels = {lv.label for lv in result.levers}
    assert "SGD (no optimizer state)" in labels and not labels & {"AMP fp16", "AMP bf16"}
    assert [label for label, _ in result.failed] == ["AMP fp16", "AMP bf16"]
    assert all("does not run under autocast" in why for _, why in result.failed)
    assert "AMP fp16: not estimated, its step fails" in result.table()
    assert result.to_dict()["failed"][0]["label"] == "AMP fp16"


def test_no_levers_when_it_fits():
    result = memtrace.levers(make_mlp(), (2, 4), limit="1 GiB")
    assert result.fits and result.levers == () and result.table().startswith("Fits")


# ---- epochs -----------------------------------------------------------------------------------------------------

def test_flops_of_linears_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    r = memtrace.report(model, (8, 16))
    first, second = 2 * 8 * 16 * 32, 2 * 8 * 32 * 4  # 2 * B * in * out each
    assert r.flops[Phase.FORWARD] == first + second
    # backward: the weight gradient of each, and the input gradient of the second only (the model's
    # input needs none): 2x its forward for a Linear inside a network
    assert r.flops[Phase.BACKWARD] == first + 2 * second
    assert r.flops_per_iteration == 2 * first + 3 * second  # one iteration, not the two traced


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is new in PyTorch 2.8")
def test_flops_of_grouped_mm_count_each_row_once():
    # 12 rows of 8 through their experts' [8, 12] weights: 2 * 12 * 8 * 12 forward; backward makes only the
    # weight gradient (the input needs none), each expert's from its own rows: the same count
    from tiny_models import GroupedExperts

    r = memtrace.report(GroupedExperts(12), (12, 8), optimizer="sgd", steps=1)
    assert r.flops[Phase.FORWARD] == r.flops[Phase.BACKWARD] == 2 * 12 * 8 * 12


class GroupedQueryAttention(nn.Module):
    """4 query heads over 2 key/value heads of dim 8: attention alone, on a [B, 4, L, 8] query."""

    def __init__(self):
        super().__init__()
        self.kv = nn.Parameter(torch.zeros(2, 2, 16, 8))

    def forward(self, q):
        k, v = self.kv.expand(q.shape[0], -1, -1, -1, -1).unbind(1)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flops_of_grouped_query_attention_count_every_query_head(device):
    # B=2, 4 query heads, L=16 queries and keys, D=8: q @ k^T and p @ v, 2*B*H*L*L*D each (older PyTorch
    # formulas rejected fewer key/value heads than query heads). Flash attention's backward (the CPU's
    # choice in recent PyTorch; 2.5 runs grouped heads through math) recomputes the scores and makes dp, dv, dq and dk. The math backend (a
    # GPU's choice for grouped heads in float32: memory-efficient attention needs equal heads, flash a
    # 16-bit dtype) makes only dp, dv and dk: the query, a model input, needs no gradient.
    r = memtrace.report(GroupedQueryAttention(), (2, 4, 16, 8), optimizer="sgd", steps=1, device=device)
    flash = any("flash_attention" in a.op for a in r.allocations)
    assert not (flash and device == "cuda")
    product = 2 * 2 * 4 * 16 * 16 * 8
    assert r.flops[Phase.FORWARD] == 2 * product
    assert r.flops[Phase.BACKWARD] == (5 if flash else 3) * product


def test_epoch_arithmetic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    plan = memtrace.plan_epoch(model, (8, 16), dataset_size=1001, gpu="A100-80GB", samples_per_second=50.0)
    per_iter = 2 * (2 * 8 * 16 * 32) + 3 * (2 * 8 * 32 * 4)
    assert plan.iterations == 126 == math.ceil(1001 / 8) and plan.batch_size == 8
    assert plan.flops_per_iteration == per_iter
    assert plan.flops_per_epoch == per_iter * 1001 / 8
    assert plan.precision == "tf32" and plan.peak_tflops == 156.0
    assert plan.lower_bound_seconds == per_iter * 1001 / 8 / 156e12
    assert plan.estimated_seconds == 1001 / 50.0
    assert "Lower bound" in plan.table() and plan.to_dict()["iterations"] == 126
    # the same plan from an existing report traces nothing new, and bf16 reads the bf16 peak
    bf16 = memtrace.report(model, (8, 16), amp="bf16", device="cpu")
    plan = memtrace.plan_epoch(report=bf16, dataset_size=16, gpu="T4")
    assert plan.precision == "bf16" and plan.peak_tflops is None and plan.lower_bound_seconds is None
    with pytest.raises(ValueError, match="dataset_size"):
        memtrace.plan_epoch(report=bf16, dataset_size=0)
