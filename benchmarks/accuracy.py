"""Accuracy: memtrace's CPU prediction against the CPU allocator's real peak, for every suite model.

For each model and optimizer, ``memtrace.report(..., device="cpu")`` predicts and
``memtrace.measure.measure_cpu(...)`` runs the same two training steps for real under the profiler.
The table shows both peaks in MiB, the signed error (predicted - measured) / measured, the difference in
bytes, and the phase in which each peak falls. Targets (reported, not asserted): every case within 1 %, median within 0.2 %.

    python benchmarks/accuracy.py                 # the whole suite, adam and sgd (momentum 0.9)
    python benchmarks/accuracy.py --quick         # a small subset
    python benchmarks/accuracy.py --only gpt2,t5 --optimizers adam,sgd,adamw --markdown
"""

from __future__ import annotations

import statistics
import sys
import time

from common import MiB, OPTIMIZERS, header, log, quiet_stderr, short_error, suite_arguments

import torch
from tabulate import tabulate

import memtrace
from memtrace.measure import measure_cpu
from models import select

TARGET_MAX_PCT = 1.0
TARGET_MEDIAN_PCT = 0.2


def run_case(case, model, opt_name: str) -> dict:
    optimizer, optimizer_kwargs = OPTIMIZERS[opt_name]
    kwargs = dict(case.report_kwargs(), optimizer=optimizer, optimizer_kwargs=optimizer_kwargs)
    row = {"model": case.name, "optimizer": opt_name}
    t = time.perf_counter()
    try:
        rep = memtrace.report(model, **kwargs, device="cpu")
        row["predicted"] = rep.peak_bytes
        row["pred_phase"] = f"{rep.peak.phase.value} (it {rep.peak.iteration})"
        row["pred_where"] = rep.peak.module or "?"
    except Exception as exc:  # reported, not fatal: the suite goes on
        row["report_error"] = short_error(exc)
    row["report_s"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        with quiet_stderr():
            meas = measure_cpu(model, **kwargs)
        row["measured"] = meas.peak_bytes
        row["meas_phase"] = max(meas.peak_by_phase, key=meas.peak_by_phase.get) if meas.peak_by_phase else "?"
    except Exception as exc:
        row["measure_error"] = short_error(exc)
    row["measure_s"] = time.perf_counter() - t
    if "predicted" in row and "measured" in row:
        row["error_pct"] = (row["predicted"] - row["measured"]) / row["measured"] * 100
    return row


def table(rows: list[dict], markdown: bool) -> str:
    out = []
    for r in rows:
        err = r.get("error_pct")
        out.append([
            r["model"], r["optimizer"],
            f"{r['predicted'] / MiB:.2f}" if "predicted" in r else "fails",
            f"{r['measured'] / MiB:.2f}" if "measured" in r else "fails",
            f"{err:+.3f}" if err is not None else "-",
            f"{r['predicted'] - r['measured']:+,}" if err is not None else "-",
            "" if err is None else ("ok" if abs(err) <= TARGET_MAX_PCT else "MISS"),
            r.get("pred_phase", "-"), r.get("meas_phase", "-"),
            f"{r['report_s']:.1f}", f"{r['measure_s']:.1f}",
        ])
    headers = ["model", "optimizer", "predicted MiB", "measured MiB", "error %", "diff bytes", "<=1%",
               "predicted peak phase", "measured peak phase", "report s", "measure s"]
    return tabulate(out, headers=headers, tablefmt="github" if markdown else "simple",
                    disable_numparse=True, colalign=("left", "left", "right", "right", "right", "right", "left", "left", "left", "right", "right"))


def summary(rows: list[dict]) -> list[str]:
    errs = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    lines = []
    if errs:
        worst = max((r for r in rows if "error_pct" in r), key=lambda r: abs(r["error_pct"]))
        within = sum(e <= TARGET_MAX_PCT for e in errs)
        within_02 = sum(e <= TARGET_MEDIAN_PCT for e in errs)
        median = statistics.median(errs)
        lines.append(
            f"cases: {len(rows)} compared: {len(errs)}; median |error| {median:.3f}% "
            f"(target <= {TARGET_MEDIAN_PCT}%: {'met' if median <= TARGET_MEDIAN_PCT else 'NOT met'}); "
            f"max |error| {abs(worst['error_pct']):.3f}% ({worst['model']}/{worst['optimizer']}); "
            f"within 1%: {within}/{len(errs)}; within 0.2%: {within_02}/{len(errs)}"
        )
    for r in rows:
        for key in ("report_error", "measure_error"):
            if key in r:
                lines.append(f"{r['model']}/{r['optimizer']}: {key.split('_')[0]} fails: {r[key]}")
    return lines


def main(argv=None) -> int:
    ap = suite_arguments(__doc__)
    ap.add_argument("--optimizers", default="adam,sgd", help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    args = ap.parse_args(argv)
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in opts if o not in OPTIMIZERS]
    if bad:
        ap.error(f"--optimizers: unknown {bad}; valid: {', '.join(OPTIMIZERS)}")
    cases = select(args.only, args.quick)

    start = time.perf_counter()
    for line in header():
        print(line)
    print(f"accuracy: memtrace.report(device='cpu') vs measure_cpu (torch.profiler allocation events), "
          f"{len(cases)} models x {len(opts)} optimizers, steps=2; error = (predicted - measured) / measured")
    print(flush=True)
    rows = []
    for case in cases:
        torch.manual_seed(0)
        with quiet_stderr():
            model = case.factory()
        for opt in opts:
            log(f"[{time.perf_counter() - start:6.1f}s] {case.name} / {opt} ...")
            row = run_case(case, model, opt)
            rows.append(row)
            err = f"{row['error_pct']:+.3f}%" if "error_pct" in row else "n/a"
            log(f"          error {err} (report {row['report_s']:.1f}s, measure {row['measure_s']:.1f}s)")
        del model
    print(table(rows, args.markdown))
    print()
    for line in summary(rows):
        print(line)
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
