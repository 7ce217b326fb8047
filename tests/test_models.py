"""report() works on real architectures: torchvision, Hugging Face, recurrent nets, Python control flow, meta models.

These check that tracing succeeds and that the report is internally consistent; exact numbers are in
test_exact_bytes.py and agreement with the real run in test_against_profiler.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace
from memtrace import Category, Phase

from tiny_models import HF_MODELS, LSTMNet, token_batch

tvm = pytest.importorskip("torchvision.models")


def check_consistent(r: memtrace.Report, model: nn.Module, *, optimizer_state: bool = True, assumed=()) -> None:
    unique = {id(p): p for p in model.parameters()}.values()
    assert r.param_count == sum(p.numel() for p in unique)
    assert sum(r.by_category.values()) == r.peak_bytes > 0
    root = r.layers[0]
    assert root.name == "" and root.depth == 0
    assert root.params == r.param_count
    assert r.by_category[Category.PARAMETER] == root.param_bytes
    if r.device == "cpu":
        assert root.param_bytes == sum(p.numel() * p.element_size() for p in unique)
    else:
        assert all(a.charged_bytes % 512 == 0 for a in r.allocations)
    assert root.gradient_bytes > 0
    assert (root.optimizer_state_bytes > 0) == optimizer_state
    assert r.peak.phase in (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER)
    # byte columns are subtree totals: a row holds at least what its direct children hold
    rows = {row.name: row for row in r.layers}
    for row in r.layers:
        if row.name and row.type != "-":
            parent = rows[row.name.rpartition(".")[0]]
            for col in ("params", "param_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes"):
                assert getattr(parent, col) >= getattr(row, col), (parent.name, row.name, col)
    assert len(r.assumptions) == len(assumed) and all(a in text for a, text in zip(assumed, r.assumptions))


# ---- torchvision: built on the meta device (full-size weights cost nothing to trace) -------------------

TORCHVISION = {
    "resnet18": (lambda: tvm.resnet18(), (2, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(), (2, 3, 64, 64)),
    "vit_b_16": (lambda: tvm.vit_b_16(image_size=32), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision(name):
    make, shape = TORCHVISION[name]
    with torch.device("meta"):
        model = make()
    r = memtrace.report(model, shape, device="cuda")
    check_consistent(r, model)
    assert r.layers[0].output_shape == (2, 1000)
    if name != "vit_b_16":
        assert r.by_category[Category.BUFFER] > 0  # BatchNorm running statistics


def test_resnet18_cpu_layers():
    with torch.device("meta"):
        model = tvm.resnet18(num_classes=10)
    r = memtrace.report(model, (2, 3, 32, 32), device="cpu", optimizer="sgd")
    check_consistent(r, model, optimizer_state=False)
    conv = r.layer("layer1.0.conv1")
    assert (conv.type, conv.depth, conv.output_shape, conv.params) == ("Conv2d", 3, (2, 64, 8, 8), 64 * 64 * 9)
    assert conv.param_bytes == conv.gradient_bytes == 64 * 64 * 9 * 4
    # every parameter gets a gradient of its own size
    assert r.layers[0].gradient_bytes == r.layers[0].param_bytes == r.param_count * 4


def test_meta_and_real_torchvision_models_give_the_same_report():
    torch.manual_seed(0)
    real = tvm.mobilenet_v3_small(num_classes=10)
    with torch.device("meta"):
        meta = tvm.mobilenet_v3_small(num_classes=10)
    kwargs = dict(device="cuda", optimizer="sgd", steps=1)
    shape = (2, 3, 64, 64)
    assert memtrace.report(meta, shape, **kwargs).to_dict() == memtrace.report(real, shape, **kwargs).to_dict()


# ---- Hugging Face: tiny configs, loss from the labels ------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hugging_face(name, device):
    pytest.importorskip("transformers")
    import transformers
    model = HF_MODELS[name]()
    r = memtrace.report(model, inputs=token_batch(), device=device)
    # transformers 4.x's BERT drops an all-ones attention mask after asking torch.all(mask == 1), which fake
    # tensors cannot answer: the report says what it assumed
    old_bert = name == "bert" and int(transformers.__version__.split(".")[0]) < 5
    check_consistent(r, model, assumed=("Module 'bert' reads a value from tensor data",) if old_bert else ())
    assert r.settings["inputs"] == [{"key": "input_ids", "shape": [2, 32], "dtype": "int64"},
                                    {"key": "labels", "shape": [2, 32], "dtype": "int64"}]
    assert r.by_category[Category.INPUT] > 0


def test_gpt2_tied_weights_are_counted_once():
    pytest.importorskip("transformers")
    model = HF_MODELS["gpt2"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    r = memtrace.report(model, inputs=token_batch(), device="cpu")
    assert r.param_count == sum(p.numel() for p in model.parameters())
    assert r.layer("lm_head").params == 0  # its weight is the embedding's, owned by transformer.wte
    assert r.layer("transformer.wte").params == 1000 * 64
    assert r.layers[0].param_bytes == r.param_count * 4


def test_meta_hugging_face_model_with_meta_inputs():
    pytest.importorskip("transformers")
    real = HF_MODELS["llama"]()
    with torch.device("meta"):
        meta = HF_MODELS["llama"]()
    meta_batch = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in token_batch().items()}
    r_meta = memtrace.report(meta, inputs=meta_batch, device="cuda")
    r_real = memtrace.report(real, inputs=token_batch(), device="cuda")
    assert r_meta.to_dict() == r_real.to_dict()
    assert all(p.device.type == "meta" for p in meta.parameters())


# ---- recurrent nets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_lstm(device):
    model = LSTMNet()
    r = memtrace.report(model, (2, 5, 8), device=device)
    check_consistent(r, model)
    assert r.layer("lstm").gradient_bytes > 0 and r.layer("lstm").activation_bytes > 0


# ---- Python control flow -------------------------------------------------------------------------------

class Repeat(nn.Module):
    """Applies the same layer ``n`` times: the loop count is a plain int attribute."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        for _ in range(self.n):
            x = torch.tanh(self.lin(x))
        return x


def test_loop_count_from_an_attribute():
    reports = {n: memtrace.report(Repeat(n), (2, 8), device="cpu", optimizer="sgd") for n in (1, 3)}
    for n, r in reports.items():
        tanh = [a for a in r.allocations if a.op == "aten.tanh.default" and a.iteration == 0]
        assert len(tanh) == n
        assert all(a.category is Category.ACTIVATION for a in tanh)  # tanh saves its output
        assert r.layer("lin").params == 72 and r.layer("lin").gradient_bytes == 72 * 4
        assert r.assumptions == ()
    # two more tanh outputs (2x8 floats = 64 B each) are saved for backward
    assert reports[3].layers[0].activation_bytes - reports[1].layers[0].activation_bytes == 2 * 64
    assert reports[3].peak_bytes > reports[1].peak_bytes


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fake tensors have no values
            return self.a(x)
        return self.b(x).relu()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_data_dependent_branch_is_an_assumption(device):
    r = memtrace.report(Branch(), (2, 8), device=device)
    assert len(r.assumptions) == 1
    (assumption,) = r.assumptions
    assert "reads a value from tensor data" in assumption and ": False (assumed" in assumption
    assert "data_dependent={':item': ...}" in assumption  # the root module's key
    # the branch taken is the one for False: only `b` ran, got gradients and an output shape
    assert r.layer("b").gradient_bytes > 0 and r.layer("b").output_shape == (2, 8)
    assert r.layer("a").gradient_bytes == 0 and r.layer("a").output_shape is None
    assert "Assumptions:" in str(r) and assumption in str(r)


class ScaleByMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        k = int(x.abs().max().item())
        return self.lin(x) * (k + 1)


def test_item_is_an_assumption_and_reported_once():
    r = memtrace.report(ScaleByMax(), (2, 8), device="cpu", steps=3)
    assert len(r.assumptions) == 1  # the same op in the same module, in three iterations
    assert "(3 calls): 0.0 (assumed" in r.assumptions[0]


# ---- the three input forms -----------------------------------------------------------------------------

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, a, b=None):
        return self.lin(a) if b is None else self.lin(a) + b


@pytest.mark.parametrize("form", ["input_shape", "tensor", "tuple", "dict"])
def test_loss_fn_receives_the_batch_in_the_form_given(form):
    a, b = torch.zeros(3, 4), torch.zeros(3, 2)
    given = {"input_shape": dict(input_shape=(3, 4)), "tensor": dict(inputs=a), "tuple": dict(inputs=(a, b)),
             "dict": dict(inputs={"a": a, "b": b})}[form]
    seen = []

    def loss_fn(out, batch):
        seen.append(batch)
        return out.pow(2).mean()

    r = memtrace.report(TwoInputs(), **given, loss_fn=loss_fn, device="cpu", steps=1)
    (batch,) = seen
    if form in ("input_shape", "tensor"):
        assert isinstance(batch, torch.Tensor) and batch.shape == (3, 4)
    elif form == "tuple":
        assert isinstance(batch, tuple) and [t.shape for t in batch] == [(3, 4), (3, 2)]
    else:
        assert isinstance(batch, dict) and {k: t.shape for k, t in batch.items()} == {"a": (3, 4), "b": (3, 2)}
    n_inputs = 1 if form in ("input_shape", "tensor") else 2
    assert r.by_category[Category.INPUT] == (48 if n_inputs == 1 else 48 + 24)  # 3x4 and 3x2 floats
