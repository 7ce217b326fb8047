"""Accuracy: memtrace's prediction against the real peak of the same training step, for every suite model.

For each model, optimizer and AMP mode, ``memtrace.report(...)`` predicts and ``memtrace.measure(...)``
runs the same two training steps for real: on the CPU under the profiler (``--device cpu``, the default),
or on the GPU present with ``torch.cuda.max_memory_allocated`` (``--device cuda``; the prediction is made
for that GPU). The table shows both peaks in MiB, the signed error (predicted - measured) / measured, the
difference in bytes, and the phase in which each peak falls. Targets (reported, not asserted): on the
CPU every case within 1 % and the median within 0.2 %; on CUDA the median within 1 %, every case within
3 % and no under-estimate beyond 2 %.

    python benchmarks/accuracy.py                 # the whole suite on the CPU, adam and sgd (momentum 0.9)
    python benchmarks/accuracy.py --quick         # a small subset
    python benchmarks/accuracy.py --only gpt2,t5 --optimizers adam,sgd,adamw --markdown
    python benchmarks/accuracy.py --device cuda --optimizers sgd,adam,adamw --amp off,fp16,bf16
    python benchmarks/accuracy.py --device cuda --full-size --optimizers adamw --amp off,bf16   # training sizes

Several processes can share the suite (``--shard 2/4`` runs every fourth model from the second, and
``--rows-json`` keeps its rows); ``--merge a.json b.json ...`` prints their rows as one table.
``--traces DIR`` (CUDA) keeps, for each case off by more than ``--trace-above`` percent, the real run's
allocator trace and the predicted one, for offline diagnosis: ``DIR/<case>.real.pkl.gz`` holds the
``(action, size, address)`` of every allocator event of ``measure`` and ``DIR/<case>.predicted.pkl.gz``
the report's snapshot (``memtrace.snapshot``); ``benchmarks/trace_diff.py`` compares the two.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time

from common import (MiB, OPTIMIZERS, header, log, quiet_stderr, save_traces, short_error, start_allocator_trace,
                    stop_allocator_trace, suite_arguments)

import torch
from tabulate import tabulate

import memtrace
from memtrace.gpus import present
from models import select

# (max |error| %, median |error| %, largest under-estimate %) per device
TARGETS = {"cpu": (1.0, 0.2, 1.0), "cuda": (3.0, 1.0, 2.0)}
AMP_MODES = ("off", "fp16", "bf16")


def run_case(case, model, opt_name: str, device: str, amp: str, traces: str | None = None,
             trace_above: float = 0.0) -> dict:
    optimizer, optimizer_kwargs = OPTIMIZERS[opt_name]
    kwargs = dict(case.report_kwargs(), optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
                  amp=False if amp == "off" else amp, device=device)
    row = {"model": case.name, "optimizer": opt_name, "amp": amp}
    rep = real_trace = None
    t = time.perf_counter()
    try:
        rep = memtrace.report(model, **kwargs, gpu=present() if device == "cuda" else None)
        row["predicted"] = rep.peak_bytes
        row["predicted_reserved"] = rep.reserved_peak_bytes
        row["pred_phase"] = f"{rep.peak.phase.value} (it {rep.peak.iteration})"
        row["pred_where"] = rep.peak.module or "?"
    except Exception as exc:  # reported, not fatal: the suite goes on
        row["report_error"] = short_error(exc)
    row["report_s"] = time.perf_counter() - t
    t = time.perf_counter()
    record = traces is not None and device == "cuda"
    try:
        if record:
            start_allocator_trace()
        with quiet_stderr():
            meas = memtrace.measure(model, **kwargs)
        real_trace = stop_allocator_trace() if record else None
        row["measured"] = meas.peak_bytes
        row["measured_reserved"] = meas.reserved_peak_bytes
        row["meas_phase"] = max(meas.peak_by_phase, key=meas.peak_by_phase.get) if meas.peak_by_phase else "?"
    except Exception as exc:
        if record:
            stop_allocator_trace()
        row["measure_error"] = short_error(exc)
    row["measure_s"] = time.perf_counter() - t
    if "predicted" in row and "measured" in row:
        row["error_pct"] = (row["predicted"] - row["measured"]) / row["measured"] * 100
        if real_trace is not None and abs(row["error_pct"]) > trace_above:
            save_traces(os.path.join(traces, f"{case.name}.{opt_name}.{amp}"), real_trace, rep,
                        measured=row["measured"], peak_by_phase=meas.peak_by_phase)
    return row


def table(rows: list[dict], markdown: bool, max_pct: float) -> str:
    out = []
    for r in rows:
        err = r.get("error_pct")
        out.append([
            r["model"], r["optimizer"], r["amp"],
            f"{r['predicted'] / MiB:.2f}" if "predicted" in r else "fails",
            f"{r['measured'] / MiB:.2f}" if "measured" in r else "fails",
            f"{err:+.3f}" if err is not None else "-",
            f"{r['predicted'] - r['measured']:+,}" if err is not None else "-",
            "" if err is None else ("ok" if abs(err) <= max_pct else "MISS"),
            r.get("pred_phase", "-"), r.get("meas_phase", "-"),
            f"{r['report_s']:.1f}", f"{r['measure_s']:.1f}",
        ])
    headers = ["model", "optimizer", "amp", "predicted MiB", "measured MiB", "error %", "diff bytes", f"<={max_pct:g}%",
               "predicted peak phase", "measured peak phase", "report s", "measure s"]
    return tabulate(out, headers=headers, tablefmt="github" if markdown else "simple",
                    disable_numparse=True, colalign=("left", "left", "left", "right", "right", "right", "right", "left", "left", "left", "right", "right"))


def summary(rows: list[dict], device: str) -> list[str]:
    max_pct, median_pct, under_pct = TARGETS[device]
    errs = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    lines = []
    if errs:
        worst = max((r for r in rows if "error_pct" in r), key=lambda r: abs(r["error_pct"]))
        within = sum(e <= max_pct for e in errs)
        within_median = sum(e <= median_pct for e in errs)
        under = sum(r["error_pct"] < -under_pct for r in rows if "error_pct" in r)
        median = statistics.median(errs)
        lines.append(
            f"cases: {len(rows)} compared: {len(errs)}; median |error| {median:.3f}% "
            f"(target <= {median_pct}%: {'met' if median <= median_pct else 'NOT met'}); "
            f"max |error| {abs(worst['error_pct']):.3f}% ({worst['model']}/{worst['optimizer']}/{worst['amp']}); "
            f"within {max_pct:g}%: {within}/{len(errs)}; within {median_pct:g}%: {within_median}/{len(errs)}; "
            f"under-estimates beyond {under_pct:g}%: {under}"
        )
    reserved = [(r["predicted_reserved"] - r["measured_reserved"]) / r["measured_reserved"] * 100 for r in rows
                if r.get("predicted_reserved") and r.get("measured_reserved")]
    if reserved:
        lines.append(f"max_memory_reserved: {len(reserved)} cases; median |error| "
                     f"{statistics.median(abs(e) for e in reserved):.2f}%; range {min(reserved):+.2f}% to "
                     f"{max(reserved):+.2f}%")
    for r in rows:
        for key in ("report_error", "measure_error"):
            if key in r:
                lines.append(f"{r['model']}/{r['optimizer']}: {key.split('_')[0]} fails: {r[key]}")
    return lines


def print_results(rows: list[dict], args) -> None:
    print(table(rows, args.markdown, TARGETS[args.device][0]))
    print()
    for line in summary(rows, args.device):
        print(line)


class _Stopped(BaseException):  # not an Exception: a case's own error handling must not catch it
    pass


def _stop(signum, frame):
    raise _Stopped()


def main(argv=None) -> int:
    ap = suite_arguments(__doc__)
    ap.add_argument("--optimizers", default="adam,sgd", help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the real step runs")
    ap.add_argument("--amp", default="off", help=f"comma-separated AMP modes, from {', '.join(AMP_MODES)}")
    ap.add_argument("--full-size", action="store_true", help="models at training sizes (benchmarks/models.py, "
                                                              "FULL_SIZE; for a GPU) instead of the suite")
    ap.add_argument("--shard", default="1/1", help="K/N: run the K-th of every N models (1-based)")
    ap.add_argument("--rows-json", help="also write the rows to this JSON file")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print the rows of these --rows-json files as one table")
    ap.add_argument("--traces", help="CUDA: keep real and predicted allocator traces of the cases off, in this folder")
    ap.add_argument("--trace-above", type=float, default=0.1, help="percent error above which --traces keeps a case")
    args = ap.parse_args(argv)
    if args.merge:
        rows = []
        for path in args.merge:
            if os.path.exists(path):
                with open(path) as f:
                    rows += json.load(f)
            else:
                print(f"{path}: missing (that shard wrote no rows)")
        print_results(rows, args)
        return 0
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in opts if o not in OPTIMIZERS]
    if bad:
        ap.error(f"--optimizers: unknown {bad}; valid: {', '.join(OPTIMIZERS)}")
    amps = [a.strip() for a in args.amp.split(",") if a.strip()]
    if any(a not in AMP_MODES for a in amps):
        ap.error(f"--amp: unknown {[a for a in amps if a not in AMP_MODES]}; valid: {', '.join(AMP_MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False)")
    cases = select(args.only, args.quick, args.full_size)
    k, n = (int(x) for x in args.shard.split("/"))
    cases = cases[k - 1::n]
    if args.traces:
        os.makedirs(args.traces, exist_ok=True)

    start = time.perf_counter()
    for line in header():
        print(line)
    truth = ("torch.profiler allocation events" if args.device == "cpu"
             else f"torch.cuda.max_memory_allocated on {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    print(f"accuracy: memtrace.report(device={args.device!r}) vs memtrace.measure ({truth}), "
          f"{len(cases)} models x {len(opts)} optimizers x {len(amps)} amp modes, steps=2; "
          f"error = (predicted - measured) / measured")
    print(flush=True)
    rows = []
    # a time limit (`timeout`, as gpu_run.sh sets) ends the run with the table of the cases done so far
    signal.signal(signal.SIGTERM, _stop)
    try:
        for case in cases:
            torch.manual_seed(0)
            with quiet_stderr():
                model = case.factory()
            for opt in opts:
                for amp in amps:
                    log(f"[{time.perf_counter() - start:6.1f}s] {case.name} / {opt} / amp {amp} ...")
                    row = run_case(case, model, opt, args.device, amp, args.traces, args.trace_above)
                    rows.append(row)
                    if args.rows_json:  # rewritten after every case, so a time limit loses none
                        with open(args.rows_json, "w") as f:
                            json.dump(rows, f)
                    err = f"{row['error_pct']:+.3f}%" if "error_pct" in row else "n/a"
                    log(f"          error {err} (report {row['report_s']:.1f}s, measure {row['measure_s']:.1f}s)")
            del model
    except _Stopped:
        total = len(cases) * len(opts) * len(amps)
        print(f"stopped by its time limit after {len(rows)} of {total} cases\n")
    print_results(rows, args)
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
