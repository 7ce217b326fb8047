"""Models as users hand them over: stored in bf16 or with mixed dtypes, compiled, in eval mode, holding
tensors in Python containers, taking nested inputs and returning a dict of losses; and steps PyTorch itself
would reject. Byte counts are exact (device="cpu" charges every storage its size)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace
from memtrace.targets import TORCH_VERSION
from memtrace import Category, TraceError

from tiny_models import make_mlp

C = Category


def two_linears(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(dtype)  # 2 * (4096 + 64) = 8320 parameters


# ---- the model's own dtypes -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_a_16_bit_model_is_predicted_in_its_dtype(dtype, name):
    r = memtrace.report(two_linears(dtype), input_shape=(8, 64), optimizer="adam", device="cpu")
    assert r.settings["dtype"] == name
    assert r.settings["inputs"][0]["dtype"] == name  # input_shape= feeds the parameters' dtype
    assert r.by_category[C.PARAMETER] == 8320 * 2  # 2 B each
    # Adam's exp_avg and exp_avg_sq in the parameters' dtype; Adam's step counters are 4 B float32 scalars
    assert r.by_category[C.OPTIMIZER_STATE] == 2 * 8320 * 2 + 4 * 4


def test_dtype_converts_as_to_would():
    r = memtrace.report(two_linears(torch.bfloat16), input_shape=(8, 64), optimizer="sgd", device="cpu",
                        dtype=torch.float32)
    assert r.settings["dtype"] == "float32" and r.by_category[C.PARAMETER] == 8320 * 4


def test_mixed_dtypes_are_kept_per_tensor():
    model = two_linears(torch.bfloat16)
    model[1].float()  # a head kept in float32
    r = memtrace.report(model, input_shape=(8, 64), optimizer="sgd", device="cpu",
                        loss_fn=lambda out, x: out.float().mean())
    assert r.settings["dtype"] == "float32+bfloat16"  # by bytes held, most first
    assert r.by_category[C.PARAMETER] == 4160 * 2 + 4160 * 4
    assert r.layer("0").param_bytes == 4160 * 2 and r.layer("1").param_bytes == 4160 * 4


def test_fp16_amp_refuses_float16_parameters_as_grad_scaler_does():
    with pytest.raises(ValueError, match="cannot unscale float16 gradients"):
        memtrace.report(two_linears(torch.float16), (8, 64), amp="fp16")
    memtrace.report(two_linears(torch.float16), (8, 64), amp="fp16", dtype=torch.float32, device="cpu")


def test_compare_starts_from_the_dtypes_held():
    rows = memtrace.compare(two_linears(torch.bfloat16), input_shape=(8, 64), device="cpu",
                            variants=None).rows
    assert rows[0].label == "bfloat16 (as given)" and rows[1].label == "fp32"
    assert rows[1].report.by_category[C.PARAMETER] == 2 * rows[0].report.by_category[C.PARAMETER]


# ---- what the report says about the model -------------------------------------------------------------------

def test_a_compiled_model_traced_eager_says_so():
    """compile=False, or a PyTorch that cannot compile on fake tensors: the eager step, and a note."""
    model = make_mlp()
    r = memtrace.report(torch.compile(model), (2, 4), device="cpu", compile=False)
    assert r.model == "Sequential" and [row.name for row in r.layers][:2] == ["", "0"]  # the module inside
    assert any("compiled with torch.compile; this report shows the eager step" in n for n in r.notes)
    assert r.peak_bytes == memtrace.report(model, (2, 4), device="cpu").peak_bytes
    assert not any("torch.compile" in n for n in memtrace.report(model, (2, 4), device="cpu").notes)
    given = memtrace.report(torch.compile(model), (2, 4), device="cpu")  # compiled where this PyTorch can
    assert (given.settings["compile"] is not None) == (TORCH_VERSION >= (2, 6))


def test_a_compiled_model_in_eval_mode_names_its_own_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 4))
    model[1].eval()
    r = memtrace.report(torch.compile(model), (2, 4), device="cpu")
    assert any(n.startswith("Module '1' was in eval mode") for n in r.notes)  # not '_orig_mod.1'


def test_a_compiled_submodule_is_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[1] = torch.compile(model[1])
    r = memtrace.report(model, (2, 4), device="cpu")
    assert any(n.startswith("Module '1' is compiled with torch.compile") for n in r.notes)


def test_eval_mode_is_said_and_traced_in_train_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).eval()
    r = memtrace.report(model, (4, 8), device="cpu")
    assert any(n.startswith("The model was in eval mode; the training step is traced in train mode") for n in r.notes)
    model.train()
    model[1].eval()
    r = memtrace.report(model, (4, 8), device="cpu")
    assert any(n.startswith("Module '1' was in eval mode") for n in r.notes)
    assert model.training and not model[1].training  # the user's flags are left as they were
    assert not any("eval mode" in n for n in memtrace.report(model.train(), (4, 8), device="cpu").notes)
    assert not any("eval mode" in n for n in memtrace.report(model.eval(), (4, 8), device="cpu", train=False).notes)


# ---- steps PyTorch rejects ----------------------------------------------------------------------------------

class ModifiesSavedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.sigmoid(self.lin(x))
        y.add_(1)  # sigmoid's backward needs its output as it was
        return y


def test_a_saved_tensor_modified_in_place_fails_as_in_pytorch():
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as real:
        ModifiesSavedOutput()(torch.randn(2, 8)).sum().backward()
    with pytest.raises(TraceError) as traced:
        memtrace.report(ModifiesSavedOutput(), (2, 8), device="cpu")
    msg = str(traced.value)
    assert msg.startswith("backward of iteration 0 failed: one of the variables needed for gradient computation "
                          "has been modified by an inplace operation: [torch.FloatTensor [2, 8]]")
    assert "is at version 1; expected version 0 instead" in msg and "is at version 1" in str(real.value)
    assert "saved in forward by the root module for SigmoidBackward0" in msg


def test_in_place_ops_that_autograd_allows_still_trace():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.SiLU(inplace=True))
    assert memtrace.report(model, (2, 8), device="cpu").peak_bytes > 0


# ---- tensors held in Python containers, nested inputs, a dict of losses ------------------------------------

class Anchors(nn.Module):
    """Keeps tensors in a list, a dict and a tuple, as torchvision's anchor generator keeps its cell
    anchors: no Module.to() moves them, but they are the module's."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cells = [torch.ones(16, 4), torch.ones(32, 4)]
        self.table = {"scale": (torch.ones(8),)}

    def forward(self, x):
        return self.lin(x) + self.cells[0].sum() + self.cells[1].sum() + self.table["scale"][0].sum()


def test_tensors_in_containers_are_made_fake_and_counted():
    model = Anchors()
    r = memtrace.report(model, (2, 4), device="cpu", optimizer="sgd")
    # held like buffers: 16*4*4 + 32*4*4 + 8*4 = 800 B
    assert r.by_category[C.BUFFER] == 800
    assert type(model.cells[0]) is torch.Tensor and model.cells[0].sum().item() == 64  # the user's, untouched


class Detector(nn.Module):
    """Takes a list of images and a list of target dicts; returns a dict of scalar losses in training."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(16, 4)

    def forward(self, images, targets, scale=1.0):
        feats = torch.stack([self.backbone(img.flatten()) for img in images])
        boxes = torch.stack([t["boxes"].sum(0) for t in targets])
        return {"loss_box": (feats - boxes).pow(2).mean() * scale, "loss_cls": feats.mean()}


def test_nested_inputs_and_a_dict_of_losses():
    images = [torch.rand(4, 4) for _ in range(3)]
    targets = [{"boxes": torch.rand(2, 4), "labels": torch.tensor([1, 2])} for _ in range(3)]
    r = memtrace.report(Detector(), inputs=(images, targets, 2.0), device="cpu", optimizer="sgd")
    keys = [i["key"] for i in r.settings["inputs"]]
    assert keys == ["0[0]", "0[1]", "0[2]", "1[0].boxes", "1[0].labels", "1[1].boxes", "1[1].labels",
                    "1[2].boxes", "1[2].labels"]
    # every input of one step: 3 images of 16 floats, 3 x (8 floats + 2 int64) = 3*64 + 3*(32 + 16)
    assert r.by_category[C.INPUT] == 3 * 64 + 3 * 48
    measured = memtrace.measure(Detector(), inputs=(images, targets, 2.0), device="cpu", optimizer="sgd")
    assert measured.peak_bytes - r.peak_bytes in range(0, 64)  # Python scalars the kernels wrap: 8-12 B each


def test_the_loss_fn_gets_the_nested_batch_as_given():
    images = [torch.rand(4, 4)]
    targets = [{"boxes": torch.rand(2, 4)}]
    seen = []

    def loss_fn(out, batch):
        seen.append(batch)
        return out["loss_box"]

    memtrace.report(Detector(), inputs=(images, targets), device="cpu", loss_fn=loss_fn, steps=1)
    (batch,) = seen
    assert isinstance(batch, tuple) and isinstance(batch[0], list) and set(batch[1][0]) == {"boxes"}


class CastsItsRouter(nn.Module):
    """Converts a submodule inside forward, as Switch Transformers' router does
    (``self.classifier = self.classifier.to(self.dtype)``)."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(16, 4)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        self.classifier = self.classifier.to(torch.float32)
        return self.proj(x) * self.classifier(x.float()).softmax(-1).sum(-1, keepdim=True).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_module_converted_inside_forward(dtype):
    model = CastsItsRouter().to(dtype)
    r = memtrace.report(model, (4, 16), device="cpu", optimizer="sgd")
    assert r.peak_bytes > 0 and next(model.classifier.parameters()).dtype == dtype  # the user's, unconverted
