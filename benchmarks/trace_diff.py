"""Compare a real CUDA allocator trace with memtrace's predicted one, to find what a prediction misses.

``accuracy.py --traces DIR`` and ``cuda_checks.py --traces DIR`` keep, for every case that is off, the real
trace (``<case>.real.pkl.gz``: the ``(action, size, address)`` of each allocator event of ``measure``) and
the prediction (``<case>.predicted.pkl.gz``: the report's snapshot, whose frames name the category, module
and op of each allocation). This prints both peaks, the allocations live at the real peak and not at the
predicted one (and the other way round, by rounded size), and the first places where the two sequences
differ, aligned with difflib over (alloc or free, rounded size), each with the predicted op it follows.
Real traces carry no op names, so the alignment is what attributes an unexplained allocation.

    python benchmarks/trace_diff.py benchmarks/traces/lstm_lm.sgd.off
    python benchmarks/trace_diff.py DIR/t5.sgd.fp16 --show 40

benchmarks/traces/ keeps the traces of the H100 run's remaining misses (RESULTS.md): the LSTM (cuDNN's RNN
buffers) and the float32 LLaMA at training size.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import pickle
from collections import Counter


def _rounded(n: int) -> int:
    return 512 * ((n + 511) // 512) if n > 0 else 0  # the caching allocator's rounding, for alignment


def load(stem: str) -> tuple[list, list]:
    with gzip.open(stem + ".real.pkl.gz") as f:
        real = pickle.load(f)
    with gzip.open(stem + ".predicted.pkl.gz") as f:
        predicted = pickle.load(f)
    r = [(a, s, addr, "") for a, s, addr in real["events"] if a in ("alloc", "free_completed")]
    p = [(e["action"], e["size"], e["addr"], e["frames"][0]["name"] if e["frames"] else "")
         for e in predicted["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    return r, p


def peak(events: list) -> tuple[int, int, dict]:
    """(peak rounded bytes, event index, {address: size} live there)."""
    live: dict = {}
    current = best = at = 0
    snapshot: dict = {}
    for i, (action, size, addr, _) in enumerate(events):
        if action == "alloc":
            live[addr] = size
            current += _rounded(size)
        else:
            current -= _rounded(live.pop(addr))
        if current > best:
            best, at, snapshot = current, i, dict(live)
    return best, at, snapshot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stem", help="the path of a case's traces without .real.pkl.gz / .predicted.pkl.gz")
    ap.add_argument("--show", type=int, default=20, help="how many differing places to print")
    args = ap.parse_args(argv)
    real, predicted = load(args.stem)
    real_peak, real_at, real_live = peak(real)
    pred_peak, pred_at, pred_live = peak(predicted)
    print(f"real peak {real_peak:,} B at event {real_at} of {len(real)}; predicted {pred_peak:,} B at event "
          f"{pred_at} of {len(predicted)}; difference {pred_peak - real_peak:+,} B (rounded sizes)")
    r = Counter(_rounded(s) for s in real_live.values())
    p = Counter(_rounded(s) for s in pred_live.values())
    print("live at the real peak only:", sorted((r - p).items(), reverse=True)[:15])
    print("live at the predicted peak only:", sorted((p - r).items(), reverse=True)[:15])
    matcher = difflib.SequenceMatcher(None, [(a, _rounded(s)) for a, s, _, _ in real],
                                      [(a, _rounded(s)) for a, s, _, _ in predicted], autojunk=False)
    shown = 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        after = predicted[j1 - 1][3] if j1 else ""
        print(f"{tag}: real {[(a[0], s) for a, s, _, _ in real[i1:i2]][:8]} predicted "
              f"{[(a[0], s, f[:60]) for a, s, _, f in predicted[j1:j2]][:6]} after: {after[:90]}")
        shown += 1
        if shown >= args.show:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
