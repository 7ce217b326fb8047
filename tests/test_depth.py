"""Deep models spliced from traces of their first 2, 3 and 4 layers (``memtrace.depth``) against the whole
model's trace: equal field for field (byte for byte in JSON) where the layers line up, the whole trace where
they do not, and which stacks are spliced at all."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import memtrace
from memtrace import depth, engine
from memtrace.options import parse_options
from memtrace.report import build_report
from tiny_models import token_batch

CUDA = {"device": "cuda", "gpu": "H100"}


class Block(nn.Module):
    def __init__(self, width: int, index: int = 0, extra_at: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.index = index  # a layer's own index, as transformers' layer_idx
        self.extra_at = extra_at

    def forward(self, x):
        h = torch.relu(self.fc(self.norm(x)))
        if self.index == self.extra_at:  # behaviour a layer takes from its index
            h = h * torch.sigmoid(h)
        return x + h


class Stacked(nn.Module):
    def __init__(self, layers: int = 6, width: int = 16, extra_at: int | None = None, sequential: bool = False):
        super().__init__()
        self.inp = nn.Linear(8, width)
        blocks = [Block(width, i, extra_at) for i in range(layers)]
        self.blocks = nn.Sequential(*blocks) if sequential else nn.ModuleList(blocks)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _spliced_and_traced(model, **kw):
    options = parse_options(model, **kw)
    stack = depth.find_stack(model, options, min_layers=4)
    assert stack is not None
    return options, depth.splice(model, options, stack), engine.trace(model, options)


def _same_trace(model, **kw) -> None:
    options, spliced, full = _spliced_and_traced(model, **kw)
    assert depth.difference(spliced, full) is None
    a, b = build_report(model, options, spliced), build_report(model, options, full)
    assert a == b
    assert a.to_json() == b.to_json()


@pytest.mark.parametrize("kw", [
    dict(optimizer="adam", **CUDA),  # foreach Adam: one temporary per parameter per op
    dict(optimizer="adam", device="cpu"),  # for-loop Adam: one parameter's temporaries freed at the next's
    dict(optimizer="sgd", optimizer_kwargs={"momentum": 0.9}, **CUDA),
    dict(optimizer="adamw", amp="fp16", **CUDA),  # GradScaler's data-dependent check, the same at every depth
    dict(optimizer="adamw", checkpoint="auto", **CUDA),  # each layer recomputed in backward
    dict(optimizer="sgd", accumulation_steps=2, steps=3, **CUDA),
    dict(train=False, **CUDA),  # each layer's input freed after the next layer ran
], ids=["adam-cuda", "adam-cpu", "sgd-momentum", "fp16-amp", "checkpoint", "accumulation", "eval"])
def test_spliced_stack_equals_its_trace(kw):
    _same_trace(Stacked(6), input_shape=(4, 8), **kw)


def test_spliced_sequential_equals_its_trace():
    _same_trace(Stacked(5, sequential=True), input_shape=(4, 8), optimizer="adamw", **CUDA)


@pytest.mark.parametrize("kw", [dict(optimizer="adamw", amp="bf16", **CUDA), dict(optimizer="adamw", device="cpu")],
                         ids=["cuda-bf16", "cpu"])
def test_spliced_llama_equals_its_trace(kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=5, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    _same_trace(model, inputs=token_batch(), **kw)


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available()


needs_fsdp2 = pytest.mark.skipif(not _has_fsdp2(), reason="parallel= needs PyTorch 2.6 or later")


@needs_fsdp2
@pytest.mark.parametrize("parallel, rank", [({"fsdp": 4}, 0), ({"fsdp": 4, "reshard_after_forward": False}, 0),
                                            ({"fsdp": 2, "replicate": 2}, 3)], ids=["fsdp", "no-reshard", "hsdp"])
def test_spliced_sharded_rank_equals_its_trace(parallel, rank):
    """FSDP2 wraps each layer: its all-gathers, reshards and reduce-scatters repeat with the layers."""
    model = Stacked(6)
    options = parse_options(model, input_shape=(4, 8), optimizer="adamw", parallel=parallel, **CUDA)
    stack = depth.find_stack(model, options, min_layers=4)
    spliced, full = depth.splice(model, options, stack, rank=rank), engine.trace(model, options, rank=rank)
    assert spliced.shard_layout == full.shard_layout
    assert depth.difference(spliced, full) is None
    assert build_report(model, options, spliced).to_json() == build_report(model, options, full).to_json()


@needs_fsdp2
def test_spliced_fsdp_and_tensor_parallel_llama(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=5, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    args = dict(inputs=token_batch(), optimizer="adamw", amp="bf16", parallel={"fsdp": 2, "tp": 2}, **CUDA)
    monkeypatch.setattr(depth, "MIN_LAYERS", 4)
    spliced = memtrace.report(model, **args)
    monkeypatch.setattr(depth, "ENABLED", False)
    assert spliced.to_json() == memtrace.report(model, **args).to_json()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(5, 12), batch=st.integers(1, 6), width=st.sampled_from([8, 24, 40]))
def test_spliced_at_any_depth_and_batch(layers, batch, width):
    _same_trace(Stacked(layers, width), input_shape=(batch, 8), optimizer="adamw", **CUDA)


def test_behaviour_past_the_traced_depths_is_not_spliced():
    """Layer 3 does more than the others: the depth-4 trace shows it, the splice from 2 and 3 misses it."""
    model = Stacked(6, extra_at=3)
    options = parse_options(model, input_shape=(4, 8), optimizer="sgd", **CUDA)
    stack = depth.find_stack(model, options, min_layers=4)
    assert stack is not None  # its settings are the same but for its own index
    with pytest.raises(depth.NoSplice, match="depth 4 spliced from 2 and 3"):
        depth.splice(model, options, stack)


def test_report_splices_deep_stacks_and_falls_back(monkeypatch):
    from memtrace import sweep

    cut, whole = [], []
    real_cut, real_whole = depth.trace, sweep.trace
    monkeypatch.setattr(depth, "MIN_LAYERS", 4)
    monkeypatch.setattr(depth, "trace", lambda model, *a: cut.append(len(model.blocks)) or real_cut(model, *a))
    monkeypatch.setattr(sweep, "trace", lambda model, *a, **k: whole.append(len(model.blocks)) or real_whole(model, *a, **k))
    for model, spliced in ((Stacked(7), True), (Stacked(7, extra_at=3), False)):
        cut.clear()
        whole.clear()
        with_splice = memtrace.report(model, (4, 8), optimizer="adamw", **CUDA)
        assert cut == [2, 3, 4]
        assert whole == ([] if spliced else [7])  # where the splice misses layer 3, the whole model is traced
        monkeypatch.setattr(depth, "ENABLED", False)
        traced = memtrace.report(model, (4, 8), optimizer="adamw", **CUDA)
        monkeypatch.setattr(depth, "ENABLED", True)
        assert with_splice.to_json() == traced.to_json()


def test_answers_from_spliced_traces(monkeypatch):
    """The batch lines of max_batch_size are drawn through spliced traces: the same answer as tracing."""
    model = Stacked(8, width=64)
    monkeypatch.setattr(depth, "MIN_LAYERS", 4)
    spliced = memtrace.max_batch_size(model, (1, 8), limit="80 MiB", optimizer="adamw", **CUDA)
    monkeypatch.setattr(depth, "ENABLED", False)
    whole = memtrace.max_batch_size(model, (1, 8), limit="80 MiB", optimizer="adamw", **CUDA)
    assert spliced.batch_size == whole.batch_size
    assert spliced.report.to_json() == whole.report.to_json()


class Tagged(Block):
    def __init__(self, width, index, rate):
        super().__init__(width, index)
        self.rate = rate


@pytest.mark.parametrize("make, why", [
    (lambda: Stacked(3), "too shallow"),
    (lambda: _with_blocks([Tagged(16, i, 0.1 if i else 0.2) for i in range(6)]), "a setting differs"),
    (lambda: _with_blocks([Block(16, i) for i in range(5)] + [Block(32, 5)]), "a layer's parameters differ"),
    (lambda: _shared(), "one layer used twice"),
    (lambda: _hooked(), "a hook on one layer"),
])
def test_stacks_not_spliced(make, why):
    model = make()
    options = parse_options(model, input_shape=(4, 8), optimizer="sgd", **CUDA)
    assert depth.find_stack(model, options, min_layers=4) is None, why


def _with_blocks(blocks):
    model = Stacked(1)
    model.blocks = nn.ModuleList(blocks)
    return model


def _shared():
    block = Block(16)
    return _with_blocks([block] * 6)


def _hooked():
    model = Stacked(6)
    model.blocks[2].register_forward_hook(lambda m, a, out: None)
    return model


def test_checkpointed_optimizer_allocations_belong_to_the_optimizer():
    """Checkpointing stops a recomputed forward early by raising inside it: the module it stopped in is
    left, so the optimizer's allocations are the optimizer's."""
    options = parse_options(Stacked(2), input_shape=(4, 8), optimizer="adam", checkpoint="auto", **CUDA)
    t = engine.trace(Stacked(2), options)
    modules = {r.module for r in t.records if r.phase.value == "optimizer"}
    assert modules == {"(optimizer)"}
