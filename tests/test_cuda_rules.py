"""The CUDA target's rules, each checked on a small case with the bytes a CUDA run would allocate.

Nothing here needs a GPU: the rules decide what the traced step does, and the allocations it makes are
read off the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memtrace
from memtrace import Category, Phase, TraceError
from memtrace import cpu_kernels, targets
from memtrace.cuda_reduce import reduce_launches, reduce_scratch_bytes
from memtrace.targets import TORCH_VERSION, cuda_sdp_backend

from tiny_models import EvenExperts, NormBlock, make_mlp


def allocations_of(report, op: str):
    return [a for a in report.allocations if a.op == op]


def largest_traced(report) -> int:
    """The largest allocation the step itself made (library workspaces aside)."""
    return max(a.requested_bytes for a in report.allocations if a.category is not Category.WORKSPACE)


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(256, 256)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.lin(x))


def test_dropout_keeps_a_bool_mask_on_cuda():
    # CUDA runs native_dropout: output (64*256 floats) and a bool mask of 64*256 B kept for backward.
    r = memtrace.report(DropoutNet(), (64, 256), optimizer="sgd", device="cuda", steps=1)
    (output, mask) = allocations_of(r, "aten.native_dropout.default")
    assert (output.requested_bytes, mask.requested_bytes) == (64 * 256 * 4, 64 * 256)
    assert mask.category is Category.ACTIVATION


def test_dropout_keeps_a_float_noise_tensor_on_cpu():
    # The CPU builds the noise as empty_like(input).bernoulli_() in the input's dtype: 64*256*4 B.
    r = memtrace.report(DropoutNet(), (64, 256), optimizer="sgd", device="cpu", steps=1)
    assert not allocations_of(r, "aten.native_dropout.default")
    noise = [a for a in r.allocations if a.op == "aten.empty_like.default" and a.module == "drop"]
    assert [a.requested_bytes for a in noise] == [64 * 256 * 4]
    assert noise[0].category is Category.ACTIVATION


def test_dropout_in_eval_mode_is_not_replaced():
    model = DropoutNet().eval()
    r = memtrace.report(model, (64, 256), device="cuda", train=False)
    assert not allocations_of(r, "aten.native_dropout.default")


class Attention(nn.Module):
    def __init__(self, heads: int, head_dim: int, mask: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.mask, self.dropout = heads, head_dim, mask, dropout
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        mask = torch.ones(t, t, dtype=torch.bool).tril() if self.mask else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        return out.transpose(1, 2).reshape(b, t, -1)


def attention_report(dtype, **kwargs):
    b, t = 2, 256
    model = Attention(4, 64, **kwargs)
    return memtrace.report(model, (b, t, 256), dtype=dtype, optimizer="sgd", device="cuda", steps=1)


def test_half_attention_runs_flash_and_saves_logsumexp():
    # Flash saves the output and a float32 logsumexp [B, H, L]: 2*4*256*4 B; no [B, H, L, L] matrix.
    r = attention_report(torch.bfloat16)
    out, lse = allocations_of(r, "aten._scaled_dot_product_flash_attention_for_cpu.default")
    assert lse.requested_bytes == 2 * 4 * 256 * 4 and lse.category is Category.ACTIVATION
    assert largest_traced(r) < 2 * 4 * 256 * 256 * 2


def test_float32_attention_runs_memory_efficient_kernel():
    # fp32 has no flash kernel: memory-efficient attention, whose logsumexp is [B, H, ceil(L/32)*32].
    r = attention_report(torch.float32, dropout=0.1)
    allocs = allocations_of(r, "aten._scaled_dot_product_efficient_attention.default")
    assert 2 * 4 * 256 * 4 in [a.requested_bytes for a in allocs]
    assert largest_traced(r) < 2 * 4 * 256 * 256 * 4


def test_masked_half_attention_falls_back_to_memory_efficient():
    r = attention_report(torch.float16, mask=True)
    assert allocations_of(r, "aten._scaled_dot_product_efficient_attention.default")
    assert not allocations_of(r, "aten._scaled_dot_product_flash_attention_for_cpu.default")


def test_misaligned_head_dim_runs_math_and_holds_the_attention_matrix():
    # fp32 rows of 62 floats are not 16-byte aligned: no fused kernel on CUDA, so the [B, H, L, L]
    # probabilities (2*4*256*256*4 B) are materialised, although a CPU would run its flash kernel here.
    model = Attention(4, 62)
    r = memtrace.report(model, (2, 256, 248), optimizer="sgd", device="cuda", steps=1)
    assert largest_traced(r) >= 2 * 4 * 256 * 256 * 4
    cpu = memtrace.report(model, (2, 256, 248), optimizer="sgd", device="cpu", steps=1)
    assert largest_traced(cpu) < 2 * 4 * 256 * 256 * 4


def test_cpu_target_keeps_the_cpu_choice():
    # With dropout the CPU has no fused kernel and materialises the [B, H, L, L] probabilities.
    model = Attention(4, 64, dropout=0.1)
    r = memtrace.report(model, (2, 256, 256), optimizer="sgd", device="cpu", steps=1)
    assert largest_traced(r) >= 2 * 4 * 256 * 256 * 4


@pytest.mark.parametrize("dtype, head_dim, mask, expected", [
    (torch.bfloat16, 128, False, "flash"),
    (torch.float16, 256, False, "flash"),
    (torch.float16, 320, False, "efficient"),  # flash stops at 256
    (torch.float16, 64, True, "efficient"),  # flash takes no mask
    (torch.float32, 64, False, "efficient"),
    (torch.float32, 62, False, "math"),  # rows not 16-byte aligned
    (torch.float64, 64, False, "math"),
])
def test_backend_choice(dtype, head_dim, mask, expected):
    with torch.device("meta"):
        q = torch.empty(2, 4, 16, head_dim, dtype=dtype)
        m = torch.empty(16, 16, dtype=torch.bool) if mask else None
    assert cuda_sdp_backend(q, q, q, m, 0.0, False) == expected


@pytest.mark.parametrize("dtype, kernel", [(torch.float32, "aten._scaled_dot_product_efficient_attention.default"),
                                           (torch.bfloat16, "aten._scaled_dot_product_flash_attention_for_cpu.default")])
def test_multihead_attention_takes_the_cuda_backend(dtype, kernel):
    # nn.MultiheadAttention (torchvision's ViT) calls scaled_dot_product_attention inside
    # F.multi_head_attention_forward; the CUDA choice must reach it there too. Before, it ran the CPU's
    # choice, flash, in float32 too, and a ViT-B/16 at batch 32 came out 4.9% under an H100's peak.
    mha = nn.MultiheadAttention(64, 4, batch_first=True).to(dtype)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    r = memtrace.report(SelfAttention(), (2, 16, 64), dtype=dtype, optimizer="sgd", steps=1)
    attention = {a.op for a in r.allocations if "scaled_dot_product" in a.op and "backward" not in a.op}
    assert attention == {kernel}


@pytest.mark.parametrize("shape, requires_grad, expected", [
    ((16, 16), False, "efficient"),
    ((1, 4, 16, 16), False, "efficient"),
    ((2, 1, 1, 16), False, "efficient"),  # broadcast over heads and queries
    ((1, 4, 16, 16), True, "math"),  # a learned bias (T5's relative positions): math, as an H100 chose
    ((4, 16, 16), False, "math"),  # 3-D: check_attn_mask_shape takes only 2-D and 4-D masks
    ((2, 3, 16, 16), False, "math"),  # 3 heads against 4
])
def test_float_masks_the_fused_kernels_refuse(shape, requires_grad, expected):
    with torch.device("meta"):
        q = torch.empty(2, 4, 16, 64, dtype=torch.float32, requires_grad=True)
        m = torch.empty(shape, requires_grad=requires_grad)
    assert cuda_sdp_backend(q, q, q, m, 0.0, False) == expected


@pytest.mark.parametrize("capability, head_dim, dropout, requires_grad, expected", [
    ((8, 9), 200, 0.0, True, "efficient"),  # flash's backward takes no head dim in (192, 224] on sm86-89
    ((12, 0), 224, 0.0, True, "efficient"),  # nor on sm120-121
    ((8, 6), 256, 0.1, True, "efficient"),  # nor over 224 with dropout
    ((8, 6), 256, 0.0, True, "flash"),
    ((8, 9), 200, 0.0, False, "flash"),  # inference: no backward
    ((8, 0), 200, 0.0, True, "flash"),
    ((9, 0), 256, 0.1, True, "flash"),
])
def test_wide_heads_leave_flash_on_consumer_cards_when_training(capability, head_dim, dropout, requires_grad,
                                                                expected):
    with torch.device("meta"):
        q = torch.empty(2, 4, 16, head_dim, dtype=torch.bfloat16, requires_grad=requires_grad)
    assert cuda_sdp_backend(q, q, q, None, dropout, False, capability=capability) == expected


def test_no_flash_before_ampere():
    with torch.device("meta"):
        q = torch.empty(2, 4, 16, 64, dtype=torch.float16)
        b = torch.empty(2, 4, 16, 64, dtype=torch.bfloat16)
    assert cuda_sdp_backend(q, q, q, None, 0.0, False, capability=(7, 5)) == "efficient"
    # sdp_utils.cpp: memory-efficient attention takes bfloat16 only from sm80 on
    assert cuda_sdp_backend(b, b, b, None, 0.0, False, capability=(7, 5)) == "math"


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, passed with enable_gqa
def test_llama_at_4096_tokens_holds_no_attention_matrix(kv_heads):
    # Rotary embeddings leave q and k in float32 under AMP; CUDA autocast casts them back to bf16 for
    # attention, so flash runs (it takes grouped key/value heads as they are).
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                             num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=1000))
    ids = torch.empty(1, 4096, dtype=torch.long, device="meta")
    r = memtrace.report(model, inputs={"input_ids": ids, "labels": ids}, amp="bf16", steps=1)
    attention_matrix = 1 * 4 * 4096 * 4096 * 2  # B*H*L*L in bf16
    assert largest_traced(r) < attention_matrix
    assert allocations_of(r, "aten._scaled_dot_product_flash_attention_for_cpu.default")


class Float32Attention(Attention):
    """Attention whose q, k, v are float32 under AMP, as after a float32 rotary embedding."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).float().view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)


def test_attention_under_amp_runs_in_low_precision():
    r = memtrace.report(Float32Attention(4, 64), (2, 256, 256), amp="fp16", optimizer="sgd", steps=1)
    out, lse = allocations_of(r, "aten._scaled_dot_product_flash_attention_for_cpu.default")
    assert out.requested_bytes == 2 * 4 * 256 * 64 * 2  # the output in fp16
    no_amp = memtrace.report(Float32Attention(4, 64), (2, 256, 256), optimizer="sgd", steps=1)
    assert not allocations_of(no_amp, "aten._scaled_dot_product_flash_attention_for_cpu.default")


def test_rules_leave_the_mlp_alone():
    # No dropout, no attention: the CUDA and CPU targets trace the same ops.
    cuda = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", device="cuda")
    cpu = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", device="cpu")
    traced = [a.op for a in cuda.allocations if a.category is not Category.WORKSPACE]
    assert traced == [a.op for a in cpu.allocations]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is new in PyTorch 2.8")
@pytest.mark.parametrize("kwargs", [{}, {"amp": "bf16"}, {"dtype": torch.bfloat16}], ids=["fp32", "amp", "bf16"])
def test_mixture_of_experts_traces_in_every_precision(kwargs):
    # Hugging Face's mixture-of-experts layers call torch._grouped_mm in the weights' dtype, float32 under
    # AMP too; PyTorch's fake kernel refuses all but bf16, the GPU's runs float32 through a loop of mm
    from tiny_models import tiny_mixtral, token_batch

    model = tiny_mixtral()
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        pytest.skip("this transformers routes tokens to experts through data-dependent shapes (nonzero)")
    r = memtrace.report(model, inputs=token_batch(), optimizer="adamw", **kwargs)
    # 2 x 32 tokens, each to 2 of 4 experts: 128 rows through the [128, 64] -> [128, 256] gate/up projection
    width = 2 if kwargs.get("dtype") else 4
    grouped = [a.requested_bytes for a in r.allocations if a.op == "aten._grouped_mm.default"]
    assert grouped[0] == 128 * 256 * width


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is new in PyTorch 2.8")
@pytest.mark.parametrize("dtype, gpu, cublas", [(torch.float32, "H100", True), (torch.bfloat16, "H100", False),
                                                (torch.bfloat16, "A100", True)])
def test_grouped_mm_fallback_takes_the_cublas_workspace(dtype, gpu, cublas):
    # float32 (and bf16 off sm90/sm100) runs _grouped_mm_fallback, a loop of mm on cuBLAS: the first call of
    # each thread allocates its cuBLAS workspace, as an H100 showed (32 MiB in forward, 32 MiB in backward);
    # bf16 on sm90 runs the CUTLASS kernel and never touches cuBLAS
    r = memtrace.report(EvenExperts(), (64, 2048), optimizer="sgd", dtype=dtype, gpu=gpu, steps=1)
    workspaces = [(a.op, a.phase.value) for a in r.allocations if a.category is Category.WORKSPACE]
    assert workspaces == ([("cuBLAS workspace (main thread)", "forward"),
                           ("cuBLAS workspace (autograd thread)", "backward")] if cublas else [])


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is new in PyTorch 2.8")
def test_grouped_mm_output_rows_are_padded_to_16_bytes():
    # [12, 10] float32 output: rows of 12 floats (48 B), the last one 10: 568 B; a misaligned weight is
    # refused as the GPU kernel refuses it
    from tiny_models import GroupedExperts

    r = memtrace.report(GroupedExperts(10), (12, 8), train=False, steps=1)
    assert [a.requested_bytes for a in r.allocations if a.op == "aten._grouped_mm.default"] == [568]
    with pytest.raises(TraceError, match="multiple of 16 bytes"):
        memtrace.report(GroupedExperts(10), (12, 8))  # backward: grad_out [12, 10] has 40-byte rows


@pytest.mark.skipif(TORCH_VERSION < (2, 9), reason="CUDA runs the composite RMSNorm before PyTorch 2.9")
@pytest.mark.parametrize("dtype, width", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_rms_norm_runs_fused_on_cuda(dtype, width):
    # _fused_rms_norm: the [128, 64] output and a float32 rstd [128, 1] (512 B), which backward keeps with
    # the input; backward writes the input's and the weight's gradients. The CPU's composite keeps the
    # normalised input too (and, for bf16, a float32 copy of the input)
    r = memtrace.report(NormBlock(nn.RMSNorm(64), 64), (128, 64), dtype=dtype, optimizer="sgd", steps=1)
    norm = [(a.op, a.requested_bytes) for a in r.allocations if a.module == "norm"]
    assert norm == [("aten._fused_rms_norm.default", 128 * 64 * width), ("aten._fused_rms_norm.default", 512),
                    ("aten._fused_rms_norm_backward.default", 128 * 64 * width),
                    ("aten._fused_rms_norm_backward.default", 64 * width)]
    cpu = memtrace.report(NormBlock(nn.RMSNorm(64), 64), (128, 64), dtype=dtype, optimizer="sgd", steps=1,
                          device="cpu")
    saved = [a.requested_bytes for a in cpu.allocations if a.module == "norm" and a.category is Category.ACTIVATION]
    assert sum(saved) > 512


@pytest.mark.skipif(TORCH_VERSION < (2, 9), reason="CUDA runs the composite RMSNorm before PyTorch 2.9")
def test_rms_norm_under_amp_runs_fused_in_float32(monkeypatch):
    # from PyTorch 2.12 autocast runs rms_norm in float32: the bf16 Linear output is cast to a float32 copy
    # (kept for backward) and normalised in float32
    monkeypatch.setattr(targets, "TORCH_VERSION", max(TORCH_VERSION, (2, 12)))
    r = memtrace.report(NormBlock(nn.RMSNorm(64), 64), (128, 64), amp="bf16", optimizer="sgd", steps=1)
    forward = [(a.op, a.requested_bytes) for a in r.allocations if a.module == "norm" and a.phase is Phase.FORWARD]
    assert forward == [("aten._to_copy.default", 128 * 64 * 4), ("aten._fused_rms_norm.default", 128 * 64 * 4),
                       ("aten._fused_rms_norm.default", 512)]


@pytest.mark.skipif(TORCH_VERSION < (2, 9), reason="CUDA runs the composite RMSNorm before PyTorch 2.9")
def test_rms_norm_under_amp_before_2_12_takes_the_composite(monkeypatch):
    # 2.9-2.11 have no autocast policy for rms_norm: the bf16 activation meets the float32 weight, which
    # the fused kernel refuses (measured on an H100 with 2.11), so the composite runs, as on the CPU
    monkeypatch.setattr(targets, "TORCH_VERSION", (2, 11))
    r = memtrace.report(NormBlock(nn.RMSNorm(64), 64), (128, 64), amp="bf16", optimizer="sgd", steps=1)
    ops = {a.op for a in r.allocations if a.module == "norm"}
    assert ops and not any("_fused_rms_norm" in op for op in ops)


def test_half_layer_norm_keeps_float32_statistics_on_cuda():
    # LayerNorm(32) on a bf16 [4, 32] input: the bf16 output (256 B), and mean and rstd [4] for backward,
    # float32 on a GPU (16 B each) where the CPU kernel makes them bf16
    model = nn.LayerNorm(32).to(torch.bfloat16)
    r = memtrace.report(model, (4, 32), dtype=torch.bfloat16, optimizer="sgd", steps=1)
    layer_norm = [a.requested_bytes for a in r.allocations if a.op == "aten.native_layer_norm.default"]
    assert layer_norm == [256, 16, 16]


@pytest.mark.parametrize("gpu, expected", [
    ("H100", 4096 * 8 * 1024),  # ":4096:8" on compute capability 9.x and newer: 32 MiB
    ("RTX 5090", 4096 * 8 * 1024),
    ("A100", (4096 * 2 + 16 * 8) * 1024),  # ":4096:2:16:8" before: 8 MiB + 128 KiB
    ("T4", (4096 * 2 + 16 * 8) * 1024),
])
def test_cublas_workspace_by_gpu(gpu, expected):
    r = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", gpu=gpu)
    workspaces = [a for a in r.allocations if a.category is Category.WORKSPACE]
    # one for the main thread's handle at the first forward GEMM, one for the autograd thread's
    assert [(a.op, a.requested_bytes, a.phase.value) for a in workspaces] == [
        ("cuBLAS workspace (main thread)", expected, "forward"),
        ("cuBLAS workspace (autograd thread)", expected, "backward"),
    ]
    assert all(a.free_event is None for a in workspaces)  # kept to the end, across iterations
    assert r.by_category[Category.WORKSPACE] >= 2 * expected


def test_cublas_workspace_config_overrides(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # 16 KiB x 8, as for deterministic runs
    r = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", gpu="H100")
    assert {a.requested_bytes for a in r.allocations if a.category is Category.WORKSPACE} == {16 * 8 * 1024}


def test_no_cublas_workspace_without_gemm_or_on_cpu():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # convolutions run on cuDNN, not cuBLAS
    ops = {a.op for a in memtrace.report(conv, (2, 3, 8, 8), optimizer="sgd").allocations
           if a.category is Category.WORKSPACE}
    assert ops == {"cuDNN workspace (estimate)"}
    assert memtrace.report(make_mlp(), (3, 4), device="cpu").by_category[Category.WORKSPACE] == 0
    # on the CPU the only workspaces are the buffers convolution kernels allocate inside the op
    ops = {a.op for a in memtrace.report(conv, (2, 3, 8, 8), device="cpu").allocations
           if a.category is Category.WORKSPACE}
    assert ops <= {cpu_kernels.LABEL}


def test_cudnn_workspace_estimate():
    # Conv2d(3, 4, 3) on [2, 3, 8, 8] float32: input 384, output 288 and weight 108 elements, 3,120 B
    # together; a k x k convolution is estimated at that forward and three times it in float32 backward
    r = memtrace.report(nn.Conv2d(3, 4, 3), (2, 3, 8, 8), optimizer="sgd", steps=1)
    workspaces = [(a.requested_bytes, a.phase.value, a.free_event is not None) for a in r.allocations
                  if a.op == "cuDNN workspace (estimate)"]
    assert workspaces == [(3120, "forward", True), (9360, "backward", True)]
    half = memtrace.report(nn.Conv2d(3, 4, 3), (2, 3, 8, 8), optimizer="sgd", steps=1, dtype=torch.bfloat16)
    assert [a.requested_bytes for a in half.allocations if a.op == "cuDNN workspace (estimate)"] == [1560, 1560]
    # pointwise: none forward, half the operands backward: (384 + 1,024 + 24) x 4 / 2
    r = memtrace.report(nn.Conv2d(3, 8, 1), (2, 3, 8, 8), optimizer="sgd", steps=1)
    assert [(a.requested_bytes, a.phase.value) for a in r.allocations if a.op == "cuDNN workspace (estimate)"] == [
        (2864, "backward")]
    # depthwise: none in float32, half the operands in 16-bit backward: (512 + 288 + 36) x 2 / 2
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert not [a for a in memtrace.report(depthwise, (2, 4, 8, 8), steps=1).allocations
                if a.op == "cuDNN workspace (estimate)"]
    r = memtrace.report(depthwise, (2, 4, 8, 8), dtype=torch.bfloat16, steps=1)
    assert [(a.requested_bytes, a.phase.value) for a in r.allocations if a.op == "cuDNN workspace (estimate)"] == [
        (836, "backward")]


def test_unknown_gpu_and_gpu_on_cpu_are_rejected():
    with pytest.raises(ValueError, match=r"gpu='K80' is unknown; valid: 'H100'"):
        memtrace.report(make_mlp(), (3, 4), gpu="K80")
    with pytest.raises(ValueError, match=r"gpu='T4' given with device='cpu'"):
        memtrace.report(make_mlp(), (3, 4), gpu="T4", device="cpu")


def test_gpu_decides_the_attention_kernel():
    # A T4 (sm75) has no flash attention kernel; an H100 (sm90) does.
    model = Attention(4, 64)
    r = memtrace.report(model, (2, 256, 256), dtype=torch.float16, optimizer="sgd", gpu="T4", steps=1)
    assert allocations_of(r, "aten._scaled_dot_product_efficient_attention.default")
    r = memtrace.report(model, (2, 256, 256), dtype=torch.float16, optimizer="sgd", gpu="H100", steps=1)
    assert allocations_of(r, "aten._scaled_dot_product_flash_attention_for_cpu.default")


class GroupedAttention(nn.Module):
    """8 query heads over 2 key/value heads of dim 64, on a [B, L, 512] input."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(512, 512, bias=False)
        self.kv = nn.Linear(512, 2 * 128, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 8, 64).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, 2, 64).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).flatten(2)


def scratch(r, label):
    return [a for a in r.allocations if a.op == f"flash attention backward: {label}"]


def test_flash_backward_allocates_its_float32_accumulators():
    # B=2, H=4, L=200 (rounded up to 256), D=64: softmax_d 2*4*256 floats, dq_accum 2*256*4*64 floats
    model = Attention(4, 64)
    r = memtrace.report(model, (2, 200, 256), dtype=torch.bfloat16, optimizer="sgd", steps=1)
    (softmax_d,) = scratch(r, "float32 softmax_d")
    (dq_accum,) = scratch(r, "float32 dq accumulator")
    assert softmax_d.requested_bytes == 2 * 4 * 256 * 4 and dq_accum.requested_bytes == 2 * 256 * 4 * 64 * 4
    for a in (softmax_d, dq_accum):
        assert a.phase is Phase.BACKWARD and a.category is Category.TEMPORARY
        assert a.free_event is not None and a.free_event - a.alloc_event <= 4  # freed inside the op
    assert not scratch(r, "dk for every query head")  # the heads are not grouped


def test_flash_backward_expands_grouped_key_value_gradients():
    # dk and dv for all 8 query heads: B*L*H*D = 2*128*8*64 bf16 each, then summed into the 2 kv heads
    r = memtrace.report(GroupedAttention(), (2, 128, 512), dtype=torch.bfloat16, optimizer="sgd", steps=1)
    assert [a.requested_bytes for a in scratch(r, "dk for every query head")] == [2 * 128 * 8 * 64 * 2]
    assert [a.requested_bytes for a in scratch(r, "dv for every query head")] == [2 * 128 * 8 * 64 * 2]
    assert [a.requested_bytes for a in scratch(r, "float32 dq accumulator")] == [2 * 128 * 8 * 64 * 4]
    cpu = memtrace.report(GroupedAttention(), (2, 128, 512), dtype=torch.bfloat16, optimizer="sgd", steps=1,
                          device="cpu")
    assert not scratch(cpu, "float32 softmax_d")


def efficient_scratch(r, label):
    return [a.requested_bytes for a in r.allocations if a.op == f"memory-efficient attention backward: {label}"]


def test_float32_memory_efficient_backward_scratch():
    # B=2, H=4, M=N=100, K=64, float32 on an H100: the f32 64x64 kernel for head dims <= 64. Delta is
    # (grad_out * out).sum(-1) made contiguous: a [B, M, H, K] float32 product (204,800 B) and the
    # [B, M, H] sum (3,200 B) on the way to the [B, H, M] delta (3,200 B). The workspace holds one
    # 16-byte header and a 64x64 float tile per query block (2) and head-dim block (1), per batch and
    # head: 2 * 4 * 2 * (16 + 64*64*4) = 262,400 B.
    r = attention_report_at(torch.float32, 4, 64, 100)
    assert efficient_scratch(r, "float32 delta temporaries") == [2 * 100 * 4 * 64 * 4, 2 * 100 * 4 * 4]
    assert efficient_scratch(r, "float32 delta") == [2 * 4 * 100 * 4]
    assert efficient_scratch(r, "workspace") == [2 * 4 * 2 * (16 + 64 * 64 * 4)]
    assert not efficient_scratch(r, "contiguous grad_out")  # it is [B, L, H, K] contiguous already


def test_scratch_coexists_with_the_gradients():
    # The kernels write dq, dk and dv while their scratch is live: the tracer must see the gradients
    # allocated before the scratch, not after the op returns.
    r = attention_report_at(torch.float32, 4, 64, 100)
    grads = allocations_of(r, "aten._scaled_dot_product_efficient_attention_backward.default")
    workspace = next(a for a in r.allocations if a.op == "memory-efficient attention backward: workspace")
    assert len(grads) == 3
    assert all(g.alloc_event < workspace.alloc_event < g.free_event for g in grads)
    flash = attention_report_at(torch.bfloat16, 4, 64, 100, mask=False)
    grads = allocations_of(flash, "aten._scaled_dot_product_flash_attention_for_cpu_backward.default")
    (dq_accum,) = scratch(flash, "float32 dq accumulator")
    assert len(grads) == 3 and all(g.alloc_event < dq_accum.alloc_event < g.free_event for g in grads)


def test_half_memory_efficient_backward_computes_delta_in_the_kernel():
    # bf16 with a mask: the 64x64 kernel keeps dk/dv in registers and computes delta itself; the
    # workspace is the dq accumulator alone, in float32 (2 * 4 * 2 * (16 + 64*64*4) B).
    r = attention_report_at(torch.bfloat16, 4, 64, 100)
    assert not efficient_scratch(r, "float32 delta temporaries")
    assert efficient_scratch(r, "float32 delta") == [2 * 4 * 100 * 4]
    assert efficient_scratch(r, "workspace") == [2 * 4 * 2 * (16 + 64 * 64 * 4)]


def test_memory_efficient_kernel_depends_on_shared_memory():
    # Head dim 128 in half precision: an H100 runs the 128x128 tile (dk/dv in registers; one query block
    # per 128 queries): 2 * 2 * 2 * (16 + 128*128*4) B. An RTX 4090 (99 KiB of shared memory per block)
    # may have to fall back to the 64x64 tile, which also accumulates dk and dv in float32 over
    # 4 key splits; the larger of the two is predicted: per batch and head, dq 4 query blocks x 2
    # column blocks x (16 + 64*64*4) B plus dk and dv 4 x 64 x 128 floats each.
    h100 = attention_report_at(torch.float16, 2, 128, 256)
    assert efficient_scratch(h100, "workspace") == [2 * 2 * 2 * (16 + 128 * 128 * 4)]
    rtx = attention_report_at(torch.float16, 2, 128, 256, gpu="RTX 4090")
    assert efficient_scratch(rtx, "workspace") == [2 * 2 * (4 * 2 * (16 + 64 * 64 * 4) + 2 * 4 * 64 * 128 * 4)]


def test_memory_efficient_forward_accumulates_wide_heads_in_float32():
    # Half-precision heads over 128 run the kernel that keeps a float32 [B, M, H, Kv] output accumulator.
    r = attention_report_at(torch.float16, 2, 160, 64)
    accumulators = [a for a in r.allocations if a.op == "memory-efficient attention: float32 output accumulator"]
    assert [a.requested_bytes for a in accumulators] == [2 * 64 * 2 * 160 * 4]
    assert not [a for a in attention_report_at(torch.float16, 2, 128, 64).allocations
                if a.op == "memory-efficient attention: float32 output accumulator"]


def test_memory_efficient_seed_and_offset_stay_on_the_host():
    # _efficient_attention_forward's philox seed and offset are CPU scalars: nothing of 8 bytes is charged.
    r = attention_report_at(torch.float32, 4, 64, 100)
    outputs = allocations_of(r, "aten._scaled_dot_product_efficient_attention.default")
    assert [a.requested_bytes for a in outputs] == [2 * 100 * 4 * 64 * 4, 2 * 4 * 128 * 4]


def test_unaligned_mask_is_padded_before_the_kernel():
    # attention.cpp, preprocess_mask: a [100, 100] float bias has rows of 100 elements, not a multiple of
    # 8, so it is copied into a [100, 104] one first.
    r = attention_report_at(torch.float32, 4, 64, 100)
    assert 100 * 104 * 4 in [a.requested_bytes for a in allocations_of(r, "aten.constant_pad_nd.default")]
    aligned = attention_report_at(torch.float32, 4, 64, 96)
    assert not allocations_of(aligned, "aten.constant_pad_nd.default")


def attention_report_at(dtype, heads, head_dim, length, mask=True, gpu=None):
    model = Attention(heads, head_dim, mask=mask)
    return memtrace.report(model, (2, length, heads * head_dim), dtype=dtype, optimizer="sgd", device="cuda",
                           gpu=gpu, steps=1)


def test_convolutions_and_recurrent_layers_say_what_is_left_out():
    class ConvGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gru = nn.Conv2d(3, 4, 3), nn.GRU(4, 4)

        def forward(self, x):
            return self.gru(self.conv(x).flatten(2).permute(2, 0, 1))[0]

    r = memtrace.report(ConvGRU(), (2, 3, 8, 8), optimizer="sgd", device="cuda", steps=1)
    assert any(n.startswith("cuDNN convolution workspaces are an estimate") for n in r.notes)
    assert any(n.startswith("Recurrent layers are traced through the CPU kernels") for n in r.notes)
    mlp = memtrace.report(make_mlp(), (4, 4), optimizer="sgd", device="cuda", steps=1)
    assert not any("cuDNN" in n for n in mlp.notes)
    # on the CPU the convolution's buffers are read from its kernel, and the recurrent layer is the real one
    cpu = memtrace.report(ConvGRU(), (2, 3, 8, 8), optimizer="sgd", device="cpu", steps=1)
    assert cpu.notes == (cpu_kernels.NOTE.format(threads=torch.get_num_threads()),)


def test_flash_on_hopper_says_cudnn_attention_may_run_instead():
    h100 = attention_report_at(torch.bfloat16, 4, 64, 128, mask=False)
    assert any("cuDNN attention" in n for n in h100.notes)
    a100 = attention_report_at(torch.bfloat16, 4, 64, 128, mask=False, gpu="A100")
    assert not any("cuDNN attention" in n for n in a100.notes)
    assert not any("cuDNN attention" in n for n in attention_report_at(torch.float32, 4, 64, 128).notes)


def test_flash_pads_head_dims_to_a_multiple_of_8():
    # attention.cpp: on CUDA, flash runs on copies of q, k and v padded from 60 to 64 (pad_last_dim<8>),
    # which it saves for backward: three bf16 [2, 4, 128, 64] copies, and a padded output
    r = memtrace.report(Attention(4, 60), (2, 128, 240), dtype=torch.bfloat16, optimizer="sgd", device="cuda",
                        steps=1)
    padded = [a for a in allocations_of(r, "aten.constant_pad_nd.default") if a.phase is Phase.FORWARD]
    assert [a.requested_bytes for a in padded] == [2 * 4 * 128 * 64 * 2] * 3
    assert all(a.category is Category.ACTIVATION for a in padded)
    (out, _) = allocations_of(r, "aten._scaled_dot_product_flash_attention_for_cpu.default")
    assert out.requested_bytes == 2 * 4 * 128 * 64 * 2
    aligned = memtrace.report(Attention(4, 64), (2, 128, 256), dtype=torch.bfloat16, optimizer="sgd", device="cuda",
                              steps=1)
    assert not allocations_of(aligned, "aten.constant_pad_nd.default")


@pytest.mark.parametrize("gpu", ["H100", "A100-80GB", "RTX 4090", "T4"])
@pytest.mark.parametrize("amp", [False, "fp16", "bf16"])
def test_every_card_and_amp_mode_traces(gpu, amp):
    # the rules that read the card (kernel lists, shared memory, cuBLAS, bf16 support) on a transformer
    # with and without a padding mask, and on a CNN: each combination traces and adds up
    from tiny_models import make_cnn, tiny_gpt2, token_batch

    if gpu == "T4" and amp == "bf16":
        pytest.skip("no bfloat16 autocast before sm80")
    batch = token_batch()
    masked = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    for model, kwargs in ((tiny_gpt2(), {"inputs": batch}), (tiny_gpt2(), {"inputs": masked}),
                          (make_cnn(), {"input_shape": (4, 3, 32, 32)})):
        r = memtrace.report(model, **kwargs, amp=amp, gpu=gpu, optimizer="adamw")
        assert r.peak_bytes > 0 and sum(r.by_category.values()) == r.peak_bytes


def test_reduction_scratch_matches_the_h100():
    # 424 sums and means of random shapes, strides, reduced dims and dtypes, measured on an H100: the port
    # of gpu_reduce_kernel's sizing gives each one's scratch (staging buffer, semaphores) to the byte
    data = json.loads((Path(__file__).parent / "data" / "h100_reductions.json").read_text())
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
    mismatches = []
    for shape, strides, dims, dtype, op, keepdim, measured in data["cases"]:
        size = itemsize[dtype]
        launches = reduce_launches(shape, strides, dims, size, 4, size, keepdim=keepdim, sm_count=data["sm_count"],
                                   max_threads_per_sm=data["threads_per_sm"], input_vec_size=8 if size == 2 else 4)
        got = [n for launch in launches if launch["buffer_bytes"]
               for n in (launch["buffer_bytes"], launch["semaphore_bytes"])]
        if got != measured:
            mismatches.append((shape, strides, dims, dtype, op, measured, got))
    assert len(data["cases"]) == 424 and not mismatches
    # the bias gradient of a 2048-wide Linear over 4096 tokens, in bf16, as the H100 allocated it
    assert reduce_scratch_bytes([4096, 2048], None, [0], 2, 4) == (67108864, 64)


def reduction_scratch(r):
    return [(a.op, a.requested_bytes, a.phase.value) for a in r.allocations if a.op.startswith("reduction:")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gradient_and_loss_reductions_stage_their_partial_sums(dtype):
    # The bias gradient of Linear(2048, 2048) over 4 x 1024 tokens is a column sum of [4096, 2048]; on an
    # H100 it stages 64 partial sums per column in float32 (67,108,864 B, measured), more than the gradient.
    # The loss, a mean over [4, 1024, 2048], takes 4 B per block: 528 blocks (132 SMs x 4) on an H100.
    r = memtrace.report(nn.Linear(2048, 2048), (4, 1024, 2048), optimizer="sgd", dtype=dtype, gpu="H100", steps=1)
    assert reduction_scratch(r) == [
        ("reduction: partial results across blocks", 2112, "forward"),
        ("reduction: block semaphores", 4, "forward"),
        ("reduction: partial results across blocks", 67108864, "backward"),
        ("reduction: block semaphores", 64, "backward"),
    ]
    assert all(a.category is Category.TEMPORARY and a.free_event is not None
               for a in r.allocations if a.op.startswith("reduction:"))
    # the buffers depend on the card: a T4 has 40 SMs of 1024 threads, so 80 blocks for the mean
    t4 = memtrace.report(nn.Linear(2048, 2048), (4, 1024, 2048), optimizer="sgd", dtype=dtype, gpu="T4", steps=1)
    assert reduction_scratch(t4)[:2] == [("reduction: partial results across blocks", 320, "forward"),
                                         ("reduction: block semaphores", 4, "forward")]
    cpu = memtrace.report(nn.Linear(2048, 2048), (4, 1024, 2048), optimizer="sgd", dtype=dtype, device="cpu", steps=1)
    assert not reduction_scratch(cpu)


def test_small_reductions_stage_nothing():
    # a bias gradient over 3 rows is summed by one block per column: no buffer
    r = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", gpu="H100", steps=1)
    assert reduction_scratch(r) == []


def cublaslt(r):
    return [(a.op, a.requested_bytes, a.phase.value, a.free_event is None) for a in r.allocations
            if "cuBLASLt" in a.op]


def test_cublaslt_workspace_by_version(monkeypatch):
    # A Linear with a bias runs addmm through cuBLASLt (Blas.cpp, addmm_out_cuda_impl), which has its own
    # 1 MiB workspace. PyTorch 2.9-2.11 keep one per thread (measured on an H100 with 2.11: 1,048,576 B
    # beside the 32 MiB cuBLAS workspace); 2.5-2.8 allocate it in each call; later releases share cuBLAS's.
    monkeypatch.delenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE")
    monkeypatch.setattr(targets, "TORCH_VERSION", (2, 11))
    r = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", gpu="H100", steps=2)
    assert cublaslt(r) == [("cuBLASLt workspace (main thread)", 1024 * 1024, "forward", True)]  # backward runs mm
    monkeypatch.setattr(targets, "TORCH_VERSION", (2, 8))
    r = memtrace.report(make_mlp(), (3, 4), optimizer="sgd", gpu="H100", steps=2)
    assert cublaslt(r) == [("cuBLASLt workspace", 1024 * 1024, "forward", False)] * 4  # 2 layers x 2 steps
    monkeypatch.setattr(targets, "TORCH_VERSION", (2, 12))
    assert cublaslt(memtrace.report(make_mlp(), (3, 4), optimizer="sgd", gpu="H100")) == []


def test_cublaslt_workspace_settings(monkeypatch):
    monkeypatch.delenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE")
    monkeypatch.setattr(targets, "TORCH_VERSION", (2, 11))
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "4096")
    assert cublaslt(memtrace.report(make_mlp(), (3, 4), gpu="H100"))[0][1] == 4 * 1024 * 1024
    monkeypatch.setenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1")
    assert cublaslt(memtrace.report(make_mlp(), (3, 4), gpu="H100")) == []
    monkeypatch.delenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE")
    monkeypatch.setenv("DISABLE_ADDMM_CUDA_LT", "1")
    assert cublaslt(memtrace.report(make_mlp(), (3, 4), gpu="H100")) == []
    monkeypatch.delenv("DISABLE_ADDMM_CUDA_LT")
    no_bias = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    assert cublaslt(memtrace.report(no_bias, (3, 4), gpu="H100")) == []  # mm runs on cuBLAS


@pytest.mark.parametrize("amp, per_unit, dtype", [(False, 69, "float32"), ("bf16", 43, "bfloat16")])
def test_recurrent_layers_say_how_low_the_prediction_may_be(amp, per_unit, dtype):
    from tiny_models import LSTMNet

    r = memtrace.report(LSTMNet(), (4, 32, 8), optimizer="sgd", device="cuda", amp=amp, steps=1)
    (note,) = [n for n in r.notes if n.startswith("Recurrent layers")]
    # 2 layers, 1 direction, 4 * 32 tokens, hidden 16: per_unit * 2 * 128 * 16 B
    bound = per_unit * 2 * 128 * 16
    assert f"(2 layer(s), hidden 16, 128 tokens, {dtype}) the prediction may be low by up to about " \
           f"{memtrace.format_bytes(bound)}: {per_unit} B per layer" in note


def test_float32_grouped_query_attention_says_how_low_the_prediction_may_be():
    class GroupedAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(64, 64), nn.Linear(64, 32)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 16).transpose(1, 2)
            k, v = self.kv(x).view(b, n, 2, 16).transpose(1, 2).chunk(2, dim=-1)
            k, v = (t.repeat(1, 1, 1, 2)[..., :16].contiguous() for t in (k, v))  # 2 key/value heads of 16
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).flatten(2)

    r = memtrace.report(GroupedAttention(), (2, 128, 64), optimizer="sgd", device="cuda", steps=1)
    (note,) = [n for n in r.notes if n.startswith("Grouped-query attention in float32 runs CUDA's math backend")]
    assert f"may be low by up to {memtrace.format_bytes(2 * 4 * 128 * 128 * 4)}" in note  # [2, 4, 128, 128] float32
    bf16 = memtrace.report(GroupedAttention(), (2, 128, 64), optimizer="sgd", device="cuda", steps=1, amp="bf16")
    assert not any(n.startswith("Grouped-query") for n in bf16.notes)  # flash takes 16-bit grouped heads
