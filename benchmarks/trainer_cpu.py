"""The Hugging Face Trainer on the CPU: ``memtrace.hf.report(model, args, device="cpu")`` against the real
``Trainer.train()`` under the profiler.

A QLoRA LLaMA (bitsandbytes 4-bit base quantised on the CPU, peft LoRA adapters) and a plain one train for
two optimizer steps on a dataset of fixed-length token rows. The real peak is what the model holds before
training (its parameters, buffers and 4-bit statistics) plus the highest running sum of the profiler's
allocation events during ``train()``; the Trainer's own bookkeeping (the data loader's batches, gradient
clipping's norms, its logging scalars) is in it, and the prediction models the step only, so this measures
how much the Trainer adds. Target (reported, not asserted): within 2 %.

    python benchmarks/trainer_cpu.py [--markdown]
"""

from __future__ import annotations

import sys
import time

from common import MiB, header, log, quiet_stderr, short_error, suite_arguments

import torch
from tabulate import tabulate

import memtrace
import memtrace.hf
from memtrace.measure import _allocation_events

SEQ, BATCH = 128, 4


def llama(quantized: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4000)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if quantized else torch.float32)
    return memtrace.hf.qlora(model, r=16) if quantized else model


def held_bytes(model: torch.nn.Module) -> int:
    """The bytes a model holds: each storage of its parameters, buffers and 4-bit statistics once."""
    from memtrace.quantized import statistics

    seen, total = set(), 0
    tensors = [t for _, t in model.named_parameters()] + list(model.buffers())
    tensors += [t for n, p in model.named_parameters() for _, t in statistics(n, p)]
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def run_trainer(model, fields: dict) -> int:
    from torch.profiler import ProfilerActivity, profile
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": torch.zeros(SEQ, dtype=torch.long), "labels": torch.zeros(SEQ, dtype=torch.long)}
            for _ in range(BATCH * fields.get("gradient_accumulation_steps", 1) * 2)]
    args = TrainingArguments(output_dir="/tmp/memtrace-trainer-bench", use_cpu=True, max_steps=2, report_to=[],
                             logging_steps=1000, save_strategy="no", dataloader_num_workers=0,
                             per_device_train_batch_size=BATCH, **fields)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    before = held_bytes(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train()
    total = peak = 0
    for _, size, _ in _allocation_events(prof):
        total += size
        peak = max(peak, total)
    return before + peak


CASES = (
    ("qlora_llama", True, {"optim": "adamw_torch"}),
    ("qlora_llama_no_clip", True, {"optim": "adamw_torch", "max_grad_norm": 0.0}),
    ("qlora_llama_accum2", True, {"optim": "adamw_torch", "gradient_accumulation_steps": 2, "max_grad_norm": 0.0}),
    ("llama_full", False, {"optim": "adamw_torch", "max_grad_norm": 0.0}),
    ("llama_full_clip", False, {"optim": "adamw_torch"}),
)


def main(argv=None) -> int:
    ap = suite_arguments(__doc__)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    for line in header():
        print(line)
    out = []
    for name, quantized, fields in CASES:
        if args.only and name not in args.only.split(","):
            continue
        log(f"[{time.perf_counter() - start:6.1f}s] {name} ...")
        settings = ", ".join(f"{k}={v}" for k, v in fields.items())
        try:
            with quiet_stderr():
                model = llama(quantized)
                predicted = memtrace.hf.report(model, {"per_device_train_batch_size": BATCH, **fields},
                                               seq_len=SEQ, device="cpu").peak_bytes
                measured = run_trainer(model, fields)
        except Exception as exc:
            out.append([name, settings, short_error(exc), "", "", "", ""])
            continue
        err = 100 * (predicted - measured) / measured
        out.append([name, settings, f"{predicted / MiB:.2f}", f"{measured / MiB:.2f}", f"{err:+.3f}",
                    f"{predicted - measured:+,}", "ok" if abs(err) <= 2 else "MISS"])
    print(tabulate(out, headers=["case", "TrainingArguments", "predicted MiB", "Trainer measured MiB", "error %",
                                 "diff bytes", "<= 2%"], tablefmt="github" if args.markdown else "simple",
                   disable_numparse=True))
    print(f"\nwall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
