"""What only a GPU can settle: each CUDA behaviour memtrace models without seeing it, measured on the GPU
present beside the value memtrace uses.

1. cuBLAS workspaces: the bytes the first GEMM on the main thread, the first cuBLASLt GEMM (a Linear with
   bias) and the first GEMM of a backward pass (the autograd engine's device thread) leave allocated.
2. The attention backend PyTorch picks (``torch._fused_sdp_choice``) against memtrace's choice.
3. The attention backward's scratch: the requested-bytes peak of ``torch.autograd.grad`` above what was
   live before, less the gradients, against the scratch memtrace adds for the kernel it predicts.
4. cuDNN convolution workspaces: for every distinct convolution of a ResNet-50, the requested-bytes peak
   of the convolution (forward, then backward) less its outputs, the size memtrace estimates (a report
   note says how).
5. End to end: ``memtrace.report`` against ``memtrace.measure``, in bytes, on small attention blocks, on
   norms whose CUDA kernels keep other tensors than the CPU's (LayerNorm's float32 statistics, the
   fused RMSNorm) and on a grouped-matmul expert layer (float32 runs PyTorch's fallback loop).
6. Attention backends inside the suite's transformers: for every scaled_dot_product_attention call of one
   real forward, the backend PyTorch picks against memtrace's.

Sizes are PyTorch's requested bytes (``memory_stats()["requested_bytes.all.*"]``), so the allocator's
rounding does not blur them. Prints Markdown; paste it into benchmarks/RESULTS.md with the header.

    python benchmarks/cuda_checks.py              # on a machine with a CUDA GPU
    python benchmarks/cuda_checks.py --modelled   # only memtrace's side (no GPU needed)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from common import MiB, header, save_traces, start_allocator_trace, stop_allocator_trace

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import memtrace
from memtrace.cutlass_attention import efficient_backward_scratch
from memtrace.gpus import lookup, present
from memtrace.targets import (cublaslt_workspace_bytes, cuda_sdp_backend, cudnn_workspace_estimate,
                              flash_backward_scratch)
from tests.tiny_models import EvenExperts, NormBlock  # the blocks tests/test_against_cuda.py checks

# (label, dtype, heads, kv_heads, head_dim, length, mask, dropout)
ATTENTION_CASES = [
    ("bf16 d64 causal", torch.bfloat16, 12, 12, 64, 1024, False, 0.0),
    ("bf16 d128 causal", torch.bfloat16, 16, 16, 128, 2048, False, 0.0),
    ("bf16 d128 GQA 4:1", torch.bfloat16, 16, 4, 128, 2048, False, 0.0),
    ("fp16 d64 bool mask", torch.float16, 12, 12, 64, 1024, True, 0.0),
    ("fp16 d128 bool mask", torch.float16, 16, 16, 128, 1000, True, 0.0),
    ("fp32 d64 causal", torch.float32, 12, 12, 64, 1024, False, 0.0),
    ("fp32 d128 causal", torch.float32, 16, 16, 128, 1000, False, 0.0),
    ("bf16 d64 dropout", torch.bfloat16, 12, 12, 64, 1024, False, 0.1),
]
BATCH = 4


def requested() -> int:
    return torch.cuda.memory_stats()["requested_bytes.all.current"]


def requested_peak() -> int:
    return torch.cuda.memory_stats()["requested_bytes.all.peak"]


def fresh(dev) -> None:
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.reset_peak_memory_stats(dev)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.2f}"


# ---- 1. cuBLAS workspaces ---------------------------------------------------------------------------
def cublas_rows(gpu, dev) -> list[list]:
    modelled = gpu.cublas_workspace_bytes()
    measured = {}
    if dev is not None:
        fresh(dev)
        a = torch.randn(64, 64, device=dev, requires_grad=True)
        b = torch.randn(64, 64, device=dev)
        bias = torch.randn(64, device=dev)
        r0 = requested()
        c = a @ b
        torch.cuda.synchronize(dev)
        measured["first GEMM, main thread"] = requested() - r0 - c.nbytes
        r1 = requested()
        d = F.linear(a.detach(), b, bias)
        torch.cuda.synchronize(dev)
        measured["first Linear with bias (cuBLASLt), main thread"] = requested() - r1 - d.nbytes
        r2 = requested()
        c.sum().backward()
        torch.cuda.synchronize(dev)
        measured["first GEMM of backward (autograd thread)"] = requested() - r2 - a.grad.nbytes
        del a, b, bias, c, d
    expect = {"first GEMM, main thread": modelled,
              "first Linear with bias (cuBLASLt), main thread": cublaslt_workspace_bytes(),
              "first GEMM of backward (autograd thread)": modelled}
    return [[what, f"{expect[what]:,}", f"{measured[what]:,}" if what in measured else "-"] for what in expect]


# ---- 2 and 3. attention -----------------------------------------------------------------------------
def _qkv(dtype, heads, kv_heads, head_dim, length, device):
    # the usual layout: projections viewed as [B, L, H, D] and transposed to [B, H, L, D]
    def make(h):
        return torch.randn(BATCH, length, h, head_dim, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def _mask(length, device):
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def modelled_backend(dtype, heads, kv_heads, head_dim, length, mask, dropout, gpu) -> str:
    with torch.device("meta"):
        q, k, v = _qkv(dtype, heads, kv_heads, head_dim, length, "meta")
        m = _mask(length, "meta") if mask else None
    return cuda_sdp_backend(q, k, v, m, dropout, not mask, heads != kv_heads, gpu.capability)


def modelled_scratch(backend, dtype, heads, kv_heads, head_dim, length, dropout, gpu) -> int | None:
    elem = dtype.itemsize
    if backend == "flash":
        s = flash_backward_scratch(BATCH, heads, length, head_dim, kv_heads, length, elem)
        return sum(s.values())
    if backend == "efficient":
        s = efficient_backward_scratch(dtype, gpu.capability, BATCH, heads, length, length, head_dim, head_dim,
                                       dropout > 0)
        return max(sum(s.delta_temporaries), s.workspace_bytes) + s.delta_bytes
    return None


def _backend_names() -> dict[int, str]:
    try:
        from torch.nn.attention import SDPBackend

        return {int(v.value): name.lower() for name, v in SDPBackend.__members__.items()}
    except Exception:
        return {}


def attention_rows(gpu, dev) -> list[list]:
    names = _backend_names()
    rows = []
    for label, dtype, heads, kv_heads, head_dim, length, mask, dropout in ATTENTION_CASES:
        ours = modelled_backend(dtype, heads, kv_heads, head_dim, length, mask, dropout, gpu)
        scratch = modelled_scratch(ours, dtype, heads, kv_heads, head_dim, length, dropout, gpu)
        theirs = measured = None
        if dev is not None:
            fresh(dev)
            q, k, v = _qkv(dtype, heads, kv_heads, head_dim, length, dev)
            m = _mask(length, dev) if mask else None
            kwargs = dict(attn_mask=m, dropout_p=dropout, is_causal=not mask, enable_gqa=heads != kv_heads)
            try:
                theirs = names.get(int(torch._fused_sdp_choice(q, k, v, **kwargs)), "?")
            except Exception as exc:
                theirs = f"? ({type(exc).__name__})"
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
            g = torch.randn_like(out)
            torch.cuda.synchronize(dev)
            base = requested()
            torch.cuda.reset_peak_memory_stats(dev)
            grads = torch.autograd.grad(out, (q, k, v), g)
            torch.cuda.synchronize(dev)
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in grads}
            measured = requested_peak() - base - sum(storages.values())
            del q, k, v, m, out, g, grads
        rows.append([label, ours, theirs or "-", mib(scratch), mib(measured)])
    return rows


# ---- 4. cuDNN convolution workspaces ---------------------------------------------------------------
def resnet50_convolutions(batch: int) -> list[tuple]:
    import torchvision

    model = torchvision.models.resnet50().to("meta")
    seen: dict[tuple, None] = {}

    def hook(mod, inputs, output):
        key = (tuple(inputs[0].shape), mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
               mod.groups)
        seen.setdefault(key)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, 224, 224, device="meta"))
    for h in handles:
        h.remove()
    return list(seen)


def conv_rows(dev, dtypes=(torch.float32, torch.float16), batch: int = 32) -> list[list]:
    convs = resnet50_convolutions(batch)
    rows = []
    for dtype in dtypes:
        fwd, bwd, est_fwd, est_bwd = [], [], [], []
        for shape, cin, cout, kernel, stride, padding, groups in convs:
            x = torch.empty(shape, dtype=dtype, device="meta")
            w = torch.empty(cout, cin // groups, *kernel, dtype=dtype, device="meta")
            y = F.conv2d(x, w, None, stride, padding, 1, groups)
            est_fwd.append(cudnn_workspace_estimate(x, w, y, groups, backward=False))
            est_bwd.append(cudnn_workspace_estimate(x, w, y, groups, backward=True))
        if dev is not None:
            for shape, cin, cout, kernel, stride, padding, groups in convs:
                fresh(dev)
                x = torch.randn(shape, dtype=dtype, device=dev)
                w = torch.randn(cout, cin // groups, *kernel, dtype=dtype, device=dev)
                for _ in range(2):  # the second call runs the engine the first one settled on
                    torch.cuda.synchronize(dev)
                    base = requested()
                    torch.cuda.reset_peak_memory_stats(dev)
                    y = F.conv2d(x, w, None, stride, padding, 1, groups)
                    torch.cuda.synchronize(dev)
                    fwd_ws = requested_peak() - base - y.nbytes
                    gy = torch.randn_like(y)
                    del y
                    torch.cuda.synchronize(dev)
                    base = requested()
                    torch.cuda.reset_peak_memory_stats(dev)
                    gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, (1, 1), False,
                                                                   (0, 0), groups, (True, True, False))
                    torch.cuda.synchronize(dev)
                    bwd_ws = requested_peak() - base - gx.nbytes - gw.nbytes
                    del gx, gw, gy
                fwd.append(fwd_ws)
                bwd.append(bwd_ws)
                del x, w
        for phase, values, estimates in (("forward", fwd, est_fwd), ("backward", bwd, est_bwd)):
            rows.append([str(dtype).replace("torch.", ""), phase, len(convs),
                         mib(max(values)) if values else "-", mib(int(statistics.median(values))) if values else "-",
                         sum(1 for v in values if v > 0) if values else "-",
                         mib(max(estimates)), mib(int(statistics.median(estimates))),
                         sum(1 for v, e in zip(values, estimates) if v > e) if values else "-"])
    return rows


# ---- 5. end to end on small attention modules -----------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, heads: int, head_dim: int, mask: bool):
        super().__init__()
        self.heads, self.head_dim, self.mask = heads, head_dim, mask
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, heads * head_dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() if self.mask else None
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=not self.mask)
        return self.out(o.transpose(1, 2).reshape(b, t, -1))


def end_to_end_cases() -> list[tuple]:
    attention = [(label, lambda h=heads, d=head_dim, m=mask: Attention(h, d, m), (BATCH, 1024, heads * head_dim),
                  dict(amp=amp))
                 for label, amp, heads, head_dim, mask in (
                     ("attention fp32 (memory-efficient)", False, 12, 64, False),
                     ("attention bf16 AMP (flash or cuDNN)", "bf16", 12, 64, False),
                     ("attention fp16 AMP, bool mask (memory-efficient)", "fp16", 12, 64, True),
                     ("attention bf16 AMP, d128", "bf16", 8, 128, False))]
    norms = [("LayerNorm, bf16 weights (float32 statistics)", lambda: NormBlock(nn.LayerNorm(2048), 2048),
              (BATCH, 1024, 2048), dict(dtype=torch.bfloat16))]
    if hasattr(nn, "RMSNorm"):
        norms += [("nn.RMSNorm fp32 (fused from PyTorch 2.9)", lambda: NormBlock(nn.RMSNorm(2048), 2048),
                   (BATCH, 1024, 2048), {}),
                  ("nn.RMSNorm, bf16 weights", lambda: NormBlock(nn.RMSNorm(2048), 2048), (BATCH, 1024, 2048),
                   dict(dtype=torch.bfloat16)),
                  ("nn.RMSNorm, bf16 AMP", lambda: NormBlock(nn.RMSNorm(2048), 2048), (BATCH, 1024, 2048),
                   dict(amp="bf16"))]
    experts = []
    if hasattr(torch, "_grouped_mm"):
        experts = [("grouped matmul experts fp32 (fallback loop)", EvenExperts, (BATCH, 1024, 2048), {}),
                   ("grouped matmul experts, bf16 weights", EvenExperts, (BATCH, 1024, 2048),
                    dict(dtype=torch.bfloat16))]
    return attention + norms + experts


def end_to_end_rows(gpu, dev, traces: str | None = None) -> list[list]:
    rows = []
    for i, (label, make, shape, extra) in enumerate(end_to_end_cases()):
        model = make()
        kwargs = dict(input_shape=shape, optimizer="adamw", steps=2, **extra)
        try:
            rep = memtrace.report(model, **kwargs, gpu=gpu)
            predicted = rep.peak_bytes
            measured = None
            if dev is not None:
                if traces:
                    start_allocator_trace()
                measured = memtrace.measure(model, **kwargs).peak_bytes
                if traces:
                    events = stop_allocator_trace()
                    if predicted != measured:
                        save_traces(os.path.join(traces, f"block{i}"), events, rep, label=label, measured=measured)
        except Exception as exc:  # one case failing must not lose the others' rows
            rows.append([label, f"failed: {type(exc).__name__}: {str(exc)[:120]}", "-", "-", "-"])
            continue
        error = f"{100 * (predicted - measured) / measured:+.2f}%" if measured else "-"
        rows.append([label, f"{predicted:,}", f"{measured:,}" if measured else "-",
                     f"{predicted - measured:+,}" if measured else "-", error])
    return rows


def backend_agreement(ours: str, theirs: str) -> str:
    """'same' where memtrace predicts PyTorch's backend; cuDNN attention (sm90/sm100, PyTorch 2.10+) where
    memtrace predicts flash keeps the same tensors and scratch (section 3), so it is counted as agreeing."""
    theirs = theirs.replace("_attention", "")
    if ours == theirs:
        return "same"
    if theirs == "cudnn" and ours == "flash":
        return "same memory (cuDNN for flash)"
    return "differs"


# ---- 6. attention backends inside the suite models ---------------------------------------------------------
def suite_backend_rows(gpu, dev) -> list[list]:
    """For every scaled_dot_product_attention call in one real forward of each suite model (fp32 and both
    AMP modes): the backend PyTorch picks (torch._fused_sdp_choice on the arguments autocast passes on)
    against memtrace's choice for the same arguments."""
    from collections import Counter

    from models import select

    names = _backend_names()
    rows = []
    original = F.scaled_dot_product_attention
    for case in select("gpt2,bert_mlm,llama,llama_gqa,mixtral,t5,vit_b_16"):
        torch.manual_seed(0)
        model = case.factory().to(dev)
        args, kwargs = case.make_inputs(dev)
        for amp in ("off", "fp16", "bf16"):
            seen = Counter()
            low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)

            def probe(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
                cq, ck, cv, cm = q, k, v, attn_mask
                if low is not None:
                    cq, ck, cv = (t.to(low) if t.is_floating_point() else t for t in (q, k, v))
                    cm = attn_mask.to(low) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
                extra = dict(enable_gqa=enable_gqa) if enable_gqa else {}
                with torch.autocast("cuda", enabled=False):
                    theirs = names.get(int(torch._fused_sdp_choice(cq, ck, cv, cm, dropout_p, is_causal, scale=scale,
                                                                   **extra)), "?")
                ours = cuda_sdp_backend(cq, ck, cv, cm, dropout_p, is_causal, enable_gqa, gpu.capability)
                mask = "no mask" if cm is None else f"{str(cm.dtype).replace('torch.', '')} mask" + (
                    " (grad)" if cm.requires_grad else "")
                seen[(ours, theirs, f"{str(cq.dtype).replace('torch.', '')}, d{cq.shape[-1]}, {mask}, "
                                    f"dropout {dropout_p:g}, causal {is_causal}")] += 1
                return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                **({"enable_gqa": enable_gqa} if enable_gqa else {}), **kw)

            F.scaled_dot_product_attention = probe
            try:
                with torch.autocast("cuda", dtype=low, enabled=low is not None):
                    model(*args, **kwargs)
            except Exception as exc:
                seen[("-", "-", f"failed: {type(exc).__name__}: {str(exc)[:80]}")] += 1
            finally:
                F.scaled_dot_product_attention = original
            for (ours, theirs, what), n in sorted(seen.items()):
                rows.append([case.name, amp, what, n, ours, theirs, backend_agreement(ours, theirs)])
            if not seen:
                rows.append([case.name, amp, "no scaled_dot_product_attention call", 0, "-", "-", ""])
        del model
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modelled", action="store_true", help="only memtrace's side, for --gpu (no GPU needed)")
    ap.add_argument("--gpu", default="H100", help="the card memtrace models with --modelled")
    ap.add_argument("--traces", help="keep the real allocator trace and the predicted snapshot of each end-to-end "
                                     "case that differs, in this folder (blockN.real.pkl.gz, blockN.predicted.pkl.gz)")
    args = ap.parse_args(argv)
    if not args.modelled and not torch.cuda.is_available():
        print("cuda_checks.py measures on a CUDA GPU and torch.cuda.is_available() is False; "
              "--modelled prints memtrace's side alone", file=sys.stderr)
        return 2
    dev = None if args.modelled else torch.device("cuda", torch.cuda.current_device())
    gpu = lookup(args.gpu) if args.modelled else present()
    print("\n".join(header()))
    if dev is not None:
        cudnn = torch.backends.cudnn.version()
        print(f"GPU: {torch.cuda.get_device_name(dev)} ({gpu.sm}), CUDA {torch.version.cuda}, cuDNN {cudnn}")
    print("\n### cuBLAS workspaces (bytes left allocated)\n")
    print(tabulate(cublas_rows(gpu, dev), headers=["First call", "memtrace", "measured"], tablefmt="github",
                   disable_numparse=True))
    print("\n### Attention: backend and backward scratch (MiB)\n")
    print(f"B={BATCH}; scratch = backward's requested peak above what was live, less dq, dk, dv. memtrace's "
          "scratch is for its backend (flash stands in for cuDNN attention).\n")
    print(tabulate(attention_rows(gpu, dev), headers=["Case", "memtrace backend", "PyTorch backend",
                                                       "memtrace scratch", "measured scratch"],
                   tablefmt="github", disable_numparse=True))
    print("\n### cuDNN convolution workspaces, ResNet-50 at batch 32 (MiB; memtrace estimates them)\n")
    print(tabulate(conv_rows(dev), headers=["dtype", "pass", "distinct convolutions", "largest", "median",
                                            "with a workspace", "memtrace largest", "memtrace median",
                                            "above memtrace's"], tablefmt="github", disable_numparse=True))
    if dev is not None:
        print("\n### Attention backends inside the suite models (one real forward each)\n")
        print(tabulate(suite_backend_rows(gpu, dev), headers=["model", "amp", "call", "calls", "memtrace",
                                                               "PyTorch", ""], tablefmt="github",
                       disable_numparse=True))
    print("\n### End to end: attention, norm and expert blocks, 2 AdamW steps, report against measure (bytes)\n")
    if args.traces:
        os.makedirs(args.traces, exist_ok=True)
    print(tabulate(end_to_end_rows(gpu, dev, args.traces), headers=["Case", "predicted", "measured", "difference", "error"],
                   tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
