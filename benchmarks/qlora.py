"""Fine-tuning on the CPU: bitsandbytes 4-bit base weights, LoRA adapters, 8-bit and paged optimizers, against the
real step under the profiler (``memtrace.measure``, bitsandbytes' CPU backend).

The real models hold real quantised weights (``memtrace.quantized.quantize_4bit`` quantises them as moving
them to a device does); memtrace traces a fake copy. bitsandbytes' CPU backend runs the same Python as on a GPU
(Linear4bit, matmul_4bit, MatMul4Bit, the optimizers' state handling) with CPU kernels for its ops: the 4-bit
matmul dequantises with PyTorch ops, the optimizer update is written in PyTorch ops. What differs on a GPU
(the fused 4-bit kernel or dequantise + cuBLAS, chosen by bitsandbytes' dispatch; paged states in unified
memory) is a rule the CPU cannot check. Target (reported, not asserted): within 2 %.

    python benchmarks/qlora.py [--only NAME[,NAME]] [--markdown]
"""

from __future__ import annotations

import sys
import time

from common import MiB, header, log, quiet_stderr, short_error, suite_arguments

import torch
from tabulate import tabulate

import memtrace
import memtrace.hf
from memtrace.loading import token_inputs

TARGET_PCT = 2.0


def four_bit_mlp(quant_type: str, nested: bool):
    from bitsandbytes.nn import Linear4bit

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            kw = dict(bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=nested)
            self.up, self.down = Linear4bit(1024, 4096, **kw), Linear4bit(4096, 1024, **kw)
            self.lora_a, self.lora_b = torch.nn.Linear(1024, 16, bias=False), torch.nn.Linear(16, 4096, bias=False)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x) + self.lora_b(self.lora_a(x))))

    return Model().to("cpu"), {"input_shape": (256, 1024)}


def qlora_llama(layers: int = 4, rank: int = 16, dora: bool = False, prepare: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8000)
    model = memtrace.hf.qlora(LlamaForCausalLM(cfg).to(torch.bfloat16), r=rank, dora=dora, prepare=prepare)
    return model, {"inputs": token_inputs(model, 4, 256, "causal-lm")}


def mlp():
    return (torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)),
            {"input_shape": (256, 1024)})


# (name, build -> (model, input kwargs), report kwargs)
CASES = (
    ("linear4bit_nf4_double", lambda: four_bit_mlp("nf4", True), {"optimizer": "adamw"}),
    ("linear4bit_nf4", lambda: four_bit_mlp("nf4", False), {"optimizer": "adamw"}),
    ("linear4bit_fp4_double", lambda: four_bit_mlp("fp4", True), {"optimizer": "adamw"}),
    ("qlora_llama_r16", lambda: qlora_llama(), {"optimizer": "adamw"}),
    ("qlora_llama_r16_bf16_amp", lambda: qlora_llama(), {"optimizer": "adamw", "amp": "bf16"}),
    ("qlora_llama_r16_checkpoint", lambda: qlora_llama(), {"optimizer": "adamw", "checkpoint": "auto"}),
    ("qlora_llama_r64_adamw8bit", lambda: qlora_llama(rank=64), {"optimizer": "adamw8bit"}),
    ("qlora_llama_dora_prepared", lambda: qlora_llama(dora=True, prepare=True), {"optimizer": "adamw"}),
    ("mlp_adamw8bit", mlp, {"optimizer": "adamw8bit"}),
    ("mlp_paged_adamw8bit", mlp, {"optimizer": "paged_adamw8bit"}),
    ("mlp_adamw_fused", mlp, {"optimizer": "adamw", "optimizer_kwargs": {"fused": True}}),
)


def run_case(name, build, kwargs) -> dict:
    row = {"model": name, "settings": ", ".join(f"{k}={v}" for k, v in kwargs.items())}
    torch.manual_seed(0)
    try:
        with quiet_stderr():
            model, inputs = build()
            t = time.perf_counter()
            row["predicted"] = memtrace.report(model, **inputs, **kwargs, device="cpu").peak_bytes
            row["report_s"] = time.perf_counter() - t
            measured_kwargs = {k: v for k, v in kwargs.items() if k != "checkpoint"}
            if kwargs.get("checkpoint"):  # measure() runs the model as it is: checkpoint it the way the Trainer does
                model.gradient_checkpointing_enable({"use_reentrant": False})
            row["measured"] = memtrace.measure(model, **inputs, **measured_kwargs, device="cpu").peak_bytes
    except Exception as exc:
        row["error"] = short_error(exc)
    return row


def table(rows: list[dict], markdown: bool) -> str:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["model"], r["settings"], r["error"], "", "", "", "", ""])
            continue
        err = 100 * (r["predicted"] - r["measured"]) / r["measured"]
        out.append([r["model"], r["settings"], f"{r['predicted'] / MiB:.2f}", f"{r['measured'] / MiB:.2f}",
                    f"{err:+.3f}", f"{r['predicted'] - r['measured']:+,}", "ok" if abs(err) <= TARGET_PCT else "MISS",
                    f"{r['report_s']:.1f}"])
    return tabulate(out, headers=["case", "settings", "predicted MiB", "measured MiB", "error %", "diff bytes",
                                  f"<= {TARGET_PCT:g}%", "report s"],
                    tablefmt="github" if markdown else "simple", disable_numparse=True)


def main(argv=None) -> int:
    ap = suite_arguments(__doc__)
    args = ap.parse_args(argv)
    import bitsandbytes
    import peft

    start = time.perf_counter()
    for line in header():
        print(line)
    print(f"bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}")
    rows = []
    for name, build, kwargs in CASES:
        if args.only and name not in args.only.split(","):
            continue
        log(f"[{time.perf_counter() - start:6.1f}s] {name} ...")
        rows.append(run_case(name, build, kwargs))
    print(table(rows, args.markdown))
    print(f"\nwall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
