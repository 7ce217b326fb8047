"""Per-rank memory of sharded and data-parallel training: ``report(..., parallel=...)`` against real
multi-process runs.

Truth: ``world`` processes on this machine with the gloo backend (``torch.multiprocessing``), each applying
the same plan as memtrace does: for FSDP2, ``fully_shard`` on the model's repeated blocks and on the root,
over a real CPU device mesh, to a model built on the meta device and materialised after sharding, as FSDP2
training scripts do; for DDP, ``DistributedDataParallel`` with the same options around the model built on
the CPU. Then each runs the same step (``memtrace.step.run_steps``: forward, loss, backward, optimizer
step, 2 iterations) under the profiler.

A rank's peak is the CPU allocator's running total of allocated bytes, which each profiler allocation
event carries, counted over every thread: gloo's worker threads drop the last reference to many of
FSDP's buffers, and the profiler sees no event for a free on a thread it does not profile, so the
running sum of the events alone (as ``memtrace.measure`` computes it for one process) only grows with
each buffer a worker thread happens to free, and varies from run to run with gloo's timing.

Each configuration still runs ``--runs`` times and the table shows each rank's range; the prediction
(collectives that complete at once, on a fake process group) must fall within it, or under its minimum by
no more than the same model's one-process miss (``report`` against ``measure`` on the CPU without
``parallel=``, shown beside: a few bytes of Python scalars, and the scratch of some oneDNN kernels, as in
the one-process accuracy table).

    python benchmarks/distributed.py                 # every configuration, 3 runs each
    python benchmarks/distributed.py --only llama --runs 5
    python benchmarks/distributed.py --at-scale     # LLaMA 7B / 70B on 8 / 64 H100s beside the formulas
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from common import OPTIMIZERS as COMMON_OPTIMIZERS, MiB, header, quiet_stderr

import torch
from tabulate import tabulate

import memtrace

STEPS = 2


def llama(vocab_size: int = 4003):
    """A 4-layer LLaMA whose vocabulary FSDP shards unevenly (4,003 rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=512,
                      attn_implementation="eager")
    torch.manual_seed(0)
    ids = torch.zeros(4, 128, dtype=torch.long)
    return LlamaForCausalLM(cfg), {"inputs": {"input_ids": ids, "labels": ids}}


def llama_tp():
    """The same LLaMA with a vocabulary tensor parallel divides (4,000 rows)."""
    return llama(vocab_size=4000)


def mobilenet():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_large(num_classes=10), {"input_shape": (4, 3, 224, 224)}


MODELS = {"llama": llama, "llama_tp": llama_tp, "mobilenet_v3": mobilenet}


def _mp(param_dtype="bfloat16", reduce_dtype="float32"):
    return {"param_dtype": param_dtype, "reduce_dtype": reduce_dtype}


OPTIMIZERS = {**COMMON_OPTIMIZERS, "adamw fused": ("adamw", {"fused": True})}

# (name, model, parallel=, optimizer, activation checkpointing of the repeated blocks)
CONFIGS = [
    ("fsdp2", "llama", {"fsdp": 2}, "adamw", False),
    ("fsdp4", "llama", {"fsdp": 4}, "adamw", False),
    ("fsdp4 no reshard", "llama", {"fsdp": 4, "reshard_after_forward": False}, "adamw", False),
    ("fsdp4 bf16 params", "llama", {"fsdp": 4, "mp_policy": _mp()}, "adamw", False),
    ("fsdp4 bf16 params checkpointed", "llama", {"fsdp": 4, "mp_policy": _mp()}, "adamw fused", True),
    ("hsdp 2x2", "llama", {"fsdp": 2, "replicate": 2}, "adamw", False),
    ("fsdp2", "mobilenet_v3", {"fsdp": 2}, "sgd", False),
    ("fsdp4", "mobilenet_v3", {"fsdp": 4}, "sgd", False),
    ("fsdp4 no reshard", "mobilenet_v3", {"fsdp": 4, "reshard_after_forward": False}, "sgd", False),
    ("ddp2", "llama", {"ddp": 2}, "adamw", False),
    ("ddp4", "llama", {"ddp": 4}, "adamw", False),
    ("ddp4 bucket view", "llama", {"ddp": 4, "gradient_as_bucket_view": True}, "adamw", False),
    ("ddp4 1 MiB buckets", "llama", {"ddp": 4, "bucket_cap_mb": 1}, "adamw", False),
    ("ddp2", "mobilenet_v3", {"ddp": 2}, "sgd", False),
    ("ddp4 bucket view", "mobilenet_v3", {"ddp": 4, "gradient_as_bucket_view": True}, "sgd", False),
    ("ddp4 no buffer broadcast", "mobilenet_v3", {"ddp": 4, "broadcast_buffers": False}, "sgd", False),
    ("ddp4 + ZeRO-1", "llama", {"ddp": 4, "zero": 1}, "adamw", False),
    ("ddp2 + ZeRO-1", "mobilenet_v3", {"ddp": 2, "zero": 1}, "adamw", False),
    ("tp2", "llama_tp", {"tp": 2}, "adamw", False),
    ("tp4", "llama_tp", {"tp": 4}, "adamw", False),
    ("fsdp2 x tp2", "llama_tp", {"fsdp": 2, "tp": 2}, "adamw", False),
    ("fsdp2 x tp2 bf16 params", "llama_tp", {"fsdp": 2, "tp": 2, "mp_policy": _mp()}, "adamw", False),
]


def _count_every_thread() -> None:
    """Make the CPU allocator count every allocation and free, on whichever thread, in the running total
    each profiler allocation event carries (``total_allocated``). By default it counts only those of
    threads the profiler is enabled on; gloo's worker threads drop the last reference to many of FSDP's
    communication buffers, and those frees would never be seen, so a rank's peak would grow with every
    buffer a worker thread happened to free. The switch is c10's ``caffe2_report_cpu_memory_usage`` flag."""
    import ctypes

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def _peak(prof) -> int:
    """The largest ``total_allocated`` an allocation event carries, less what was allocated before the
    profile began."""
    from memtrace.measure import _allocation_events

    events = _allocation_events(prof)
    if not events:
        return 0
    _, size, total = events[0]
    before = total - size
    return max(total for _, _, total in events) - before


def _rank_main(rank: int, world: int, model_name: str, parallel: dict, optimizer: str, checkpoint: bool,
               out_dir: str, port: int):
    """One rank of the real run: its peak allocated bytes, written to out_dir/rank.json."""
    _count_every_thread()
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from memtrace.measure import _real_input, materialise
    from memtrace.options import parse_options
    from memtrace.parallel import apply, device_mesh, zero_redundancy
    from memtrace.step import build_optimizer, run_steps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, kw = MODELS[model_name]()
        opt, opt_kw = OPTIMIZERS[optimizer]
        options = parse_options(model, optimizer=opt, optimizer_kwargs=opt_kw, device="cpu", steps=STEPS,
                                parallel=parallel, checkpoint="auto" if checkpoint else None, **kw)
        spec = options.parallel
        mesh = device_mesh(spec) if spec.shards else None
        del model
        with torch.device("meta"):
            meta_model, _ = MODELS[model_name]()
        meta_model.train()
        if checkpoint:  # as memtrace's checkpoint="auto" does it for a Hugging Face model, before sharding
            meta_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.manual_seed(rank)
            if spec.shards:
                wrapped = apply(meta_model, spec, mesh)
                materialise(wrapped, "cpu")
            else:  # the model built on the CPU inside the profile: its parameters are the rank's
                real_model = MODELS[model_name]()[0]  # (not keeping the example inputs it also makes)
                real_model.train()
                wrapped = torch.nn.parallel.DistributedDataParallel(real_model, **dict(spec.ddp_options))
                del real_model
            if spec.zero:
                optimizer_ = zero_redundancy(options, list(wrapped.parameters()), lambda opt: None)
            else:
                optimizer_ = build_optimizer(options, list(wrapped.parameters()))
            run_steps(wrapped, options, lambda: options.inputs.build(_real_input), optimizer_, None, "cpu")
            del wrapped, optimizer_
        peak = _peak(prof)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"peak": peak}, f)
    finally:
        dist.destroy_process_group()


def real_peaks(model_name: str, parallel: dict, optimizer: str, checkpoint: bool, world: int, port: int) -> list[int]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(world, model_name, parallel, optimizer, checkpoint, out, port), nprocs=world,
                 join=True)
        peaks = []
        for r in range(world):
            with open(os.path.join(out, f"{r}.json")) as f:
                peaks.append(json.load(f)["peak"])
        return peaks


def predicted(model_name: str, parallel: dict, optimizer: str, checkpoint: bool) -> tuple[memtrace.Report, float]:
    model, kw = MODELS[model_name]()
    opt, opt_kw = OPTIMIZERS[optimizer]
    start = time.perf_counter()
    rep = memtrace.report(model, optimizer=opt, optimizer_kwargs=opt_kw, device="cpu", steps=STEPS,
                          parallel=parallel, checkpoint="auto" if checkpoint else None, **kw)
    return rep, time.perf_counter() - start


def one_process_miss(model_name: str, optimizer: str, checkpoint: bool) -> int:
    """Predicted minus measured peak of the same step on one process, without parallel=."""
    model, kw = MODELS[model_name]()
    opt, opt_kw = OPTIMIZERS[optimizer]
    args = dict(optimizer=opt, optimizer_kwargs=opt_kw, device="cpu", steps=STEPS, **kw)
    real, _ = MODELS[model_name]()
    if checkpoint:  # measure() runs the model as it is: checkpointed as a user does it
        real.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with quiet_stderr():
        measured = memtrace.measure(real, **args).peak_bytes
    return memtrace.report(model, checkpoint="auto" if checkpoint else None, **args).peak_bytes - measured


# ---- at scale: memtrace beside the formulas people use ----------------------------------------------
LLAMA_SIZES = {  # LLaMA-2 7B and LLaMA-3 70B
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}


def deepspeed_zero3(total_params: int, largest_layer_params: int, gpus: int) -> int:
    """DeepSpeed's estimate_zero3_model_states_mem_needs without offload
    (deepspeed/runtime/zero/stage3.py): 4 x the largest layer's parameters + 18 bytes a parameter / GPUs.
    Model states only."""
    return 4 * largest_layer_params + int(18 * total_params / gpus)


def accelerate_rule(total_params: int) -> int:
    """accelerate estimate-memory's training figure for Adam: 4 x the model's float32 size, on one GPU
    (it does not shard)."""
    return 4 * 4 * total_params


def megatron_activations(cfg: dict, batch: int, seq: int, recompute: bool) -> int:
    """Korthikanti et al. 2022 (Megatron): a 16-bit transformer layer keeps s*b*h*(34 + 5*a*s/h) bytes of
    activations, or its 2*s*b*h-byte input under full recomputation; times the layers."""
    s, b, h, a, layers = seq, batch, cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    per_layer = 2 * s * b * h if recompute else s * b * h * (34 + 5 * a * s / h)
    return int(per_layer * layers)


def at_scale() -> list[list]:
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    batch, seq = 1, 4096
    for name, cfg in LLAMA_SIZES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**cfg))
        total = sum(p.numel() for p in model.parameters())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        for gpus in (8, 64):
            start = time.perf_counter()
            rep = memtrace.report(model, inputs={"input_ids": ids, "labels": ids}, optimizer="adamw",
                                  optimizer_kwargs={"fused": True}, checkpoint="auto", gpu="H100",
                                  parallel={"fsdp": gpus, "mp_policy": {"param_dtype": "bf16",
                                                                         "reduce_dtype": "fp32"}})
            secs = time.perf_counter() - start
            ds = deepspeed_zero3(total, largest, gpus)
            act = megatron_activations(cfg, batch, seq, recompute=True)
            rows.append([name, gpus, f"{rep.peak_bytes / 2**30:.1f}", f"{ds / 2**30:.1f}",
                         f"{(ds + act) / 2**30:.1f}", f"{accelerate_rule(total) / 2**30:.1f}", f"{secs:.0f}"])
            print(tabulate(rows[-1:], tablefmt="plain"), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="configurations whose model or name contains this")
    ap.add_argument("--runs", type=int, default=3, help="real runs per configuration (default 3)")
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--at-scale", action="store_true",
                    help="instead: LLaMA 7B and 70B at 8 and 64 ranks on H100s, beside the formula tools")
    args = ap.parse_args()
    if args.at_scale:
        rows = at_scale()
        print("\n".join(header()))
        print("FSDP2 with bf16 parameters (MixedPrecisionPolicy), fused AdamW, activation checkpointing of every "
              "layer, 1 x 4096 tokens a rank, device='cuda', gpu='H100'\n")
        print(tabulate(rows, headers=["model", "ranks", "memtrace GiB / rank", "DeepSpeed ZeRO-3 estimator GiB",
                                      "+ Megatron activations GiB", "accelerate (one GPU) GiB", "memtrace s"],
                       tablefmt="github", disable_numparse=True))
        return 0
    rows, met, total = [], 0, 0
    misses: dict[tuple[str, str, bool], int] = {}
    port = args.port
    for name, model_name, parallel, optimizer, checkpoint in CONFIGS:
        if args.only and args.only not in model_name and args.only not in name:
            continue
        rep, secs = predicted(model_name, parallel, optimizer, checkpoint)
        world = rep.world_size
        runs = []
        for _ in range(args.runs):
            port += 1
            with quiet_stderr():
                runs.append(real_peaks(model_name, parallel, optimizer, checkpoint, world, port))
        key = (model_name, optimizer, checkpoint)
        if key not in misses:
            misses[key] = one_process_miss(*key)
        miss = misses[key]
        by_rank = {r: rp.peak_bytes for rp in rep.ranks for r in rp.ranks}
        for rank in range(world):
            seen = [run[rank] for run in runs]
            lo, hi = min(seen), max(seen)
            pred = by_rank[rank]
            inside = lo + min(miss, 0) <= pred <= hi
            total += 1
            met += inside
            off = pred - lo if pred < lo else pred - hi if pred > hi else 0
            rows.append([model_name, name, optimizer, rank, f"{lo / MiB:.3f}", f"{hi / MiB:.3f}",
                         f"{hi - lo:,}", f"{pred / MiB:.3f}", f"{off:+,}" if off else "inside", f"{miss:+,}",
                         "yes" if inside else "NO", f"{secs:.1f}"])
        print(tabulate(rows[-world:], tablefmt="plain"), file=sys.stderr, flush=True)
    print("\n".join(header()))
    print(f"real: gloo, {args.runs} runs per configuration; a rank's peak: the CPU allocator's running total over every "
          f"thread, from its profiler allocation events; steps={STEPS}\n")
    print(tabulate(rows, headers=["model", "parallel", "optimizer", "rank", "real min MiB", "real max MiB",
                                  "spread B", "predicted MiB", "outside range B", "one-process miss B", "ok",
                                  "predict s"],
                   tablefmt="github", disable_numparse=True))
    print(f"\nranks predicted within their measured range: {met}/{total}")
    return 0 if met == total else 1


if __name__ == "__main__":
    sys.exit(main())
