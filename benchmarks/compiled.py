"""Compiled steps on the CPU: ``report(..., device="cpu", compile=True)`` against the real compiled step.

For each case the real model is compiled with ``torch.compile`` (Inductor, C++ kernels built with the
machine's compiler), one warm-up step compiles its forward and backward, its gradients are dropped, and
then the same steps memtrace predicts run under the profiler with a fresh optimizer: the peak is the
parameters and buffers held before plus the highest running sum of the profiler's allocation events.
Beside it: the eager prediction and the eager step measured the same way (``memtrace.measure``), so that
the eager/compiled difference is shown for both. Target (reported, not asserted): compiled within 2 %.

    python benchmarks/compiled.py [--only NAME[,NAME]] [--markdown]
"""

from __future__ import annotations

import sys
import time

from common import MiB, header, log, quiet_stderr, short_error, suite_arguments

import torch
from tabulate import tabulate

import memtrace
from memtrace.measure import measure_compiled_cpu
from models import Case, ElementwiseMLP, _tokens, _tv, gpt2, llama

TARGET_PCT = 2.0
CASES = (
    Case("mlp_elementwise", lambda: ElementwiseMLP(512, 2048), (256, 512)),
    Case("gpt2_small_block", lambda: gpt2(n_embd=256, n_layer=2, n_head=4, vocab=4000, n_positions=256),
         _tokens(4, 128)),
    Case("llama_small", lambda: llama(hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=4000),
         _tokens(4, 128)),
    Case("resnet18", _tv("resnet18"), (8, 3, 224, 224)),
    Case("gpt2_small", lambda: gpt2(n_embd=768, n_layer=12, n_head=12, vocab=50257), _tokens(2, 256)),
)


def run_case(case: Case, optimizer: str) -> dict:
    row = {"model": case.name, "optimizer": optimizer}
    torch.manual_seed(0)
    model = case.factory()
    kw = case.report_kwargs()
    try:
        with quiet_stderr():
            t = time.perf_counter()
            predicted = memtrace.report(model, **kw, optimizer=optimizer, device="cpu", compile=True)
            row["report_s"] = time.perf_counter() - t
            eager = memtrace.report(model, **kw, optimizer=optimizer, device="cpu")
        row.update(predicted=predicted.peak_bytes, eager_predicted=eager.peak_bytes)
    except Exception as exc:
        row["error"] = f"report: {short_error(exc)}"
        return row
    try:
        with quiet_stderr():
            t = time.perf_counter()
            row["measured"] = measure_compiled_cpu(model, **kw, optimizer=optimizer).peak_bytes
            row["measure_s"] = time.perf_counter() - t
            row["eager_measured"] = memtrace.measure(model, **kw, optimizer=optimizer, device="cpu").peak_bytes
    except Exception as exc:
        row["error"] = f"measure: {short_error(exc)}"
    return row


def table(rows: list[dict], markdown: bool) -> str:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["model"], r["optimizer"], r["error"]] + [""] * 8)
            continue
        err = 100 * (r["predicted"] - r["measured"]) / r["measured"]
        eager_err = 100 * (r["eager_predicted"] - r["eager_measured"]) / r["eager_measured"]
        out.append([r["model"], r["optimizer"], f"{r['predicted'] / MiB:.2f}", f"{r['measured'] / MiB:.2f}",
                    f"{err:+.3f}", f"{r['predicted'] - r['measured']:+,}", "ok" if abs(err) <= TARGET_PCT else "MISS",
                    f"{r['eager_predicted'] / MiB:.2f}", f"{r['eager_measured'] / MiB:.2f}", f"{eager_err:+.3f}",
                    f"{100 * (r['measured'] - r['eager_measured']) / r['eager_measured']:+.1f} / "
                    f"{100 * (r['predicted'] - r['eager_predicted']) / r['eager_predicted']:+.1f}",
                    f"{r['report_s']:.1f}"])
    return tabulate(out, headers=["model", "optimizer", "compiled predicted MiB", "compiled measured MiB", "error %",
                                  "diff bytes", f"<= {TARGET_PCT:g}%", "eager predicted MiB", "eager measured MiB",
                                  "eager error %", "compiled vs eager % (measured / predicted)", "report s"],
                    tablefmt="github" if markdown else "simple", disable_numparse=True)


def main(argv=None) -> int:
    ap = suite_arguments(__doc__)
    ap.add_argument("--optimizers", default="sgd,adam", help="comma-separated (default sgd,adam)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    for line in header():
        print(line)
    cases = [c for c in CASES if not args.only or c.name in args.only.split(",")]
    rows = []
    for case in cases:
        for opt in args.optimizers.split(","):
            log(f"[{time.perf_counter() - start:6.1f}s] {case.name} {opt} ...")
            rows.append(run_case(case, opt))
    print(table(rows, args.markdown))
    print(f"\nwall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
