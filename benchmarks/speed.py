"""Speed: how long ``memtrace.report`` takes, against the two things it can be compared with.

For every suite model (two training steps, Adam, ``device="cuda"``, the default):
  (a) ``memtrace.report(model, ...)``: the whole call, including its fake copy of the model;
  (b) bare meta: the same steps on the meta device with no tracking at all (model built under
      ``torch.device("meta")``, Adam with foreach=True as on CUDA): the floor any tracer on top of
      PyTorch's dispatcher pays;
  (b') bare fake: the same steps under ``FakeTensorMode`` (fake CPU tensors, what report traces on) with
      no tracking: the floor for a tracer built on fake tensors (extra column; on meta some models take
      other code paths, e.g. nn.LSTM has no fused kernel there);
  (c) PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` over the same steps under
      ``FakeTensorMode`` (fake CPU tensors: fake CUDA tensors cannot run backward without a GPU).
For (b) and (c) building the model is not timed (it happens once, before); optimizer creation and the
steps are. Each figure is the best of ``--repeat`` runs. A last table traces deep models built on meta
(a 7B LLaMA at sequence 2048, a 70B at 4096), each in a fresh subprocess: report (its layers spliced from
traces of 2, 3 and 4), the same report with every layer traced, bare meta execution, whether the two
reports are the same JSON, the process's RSS after building the model and its peak RSS (VmHWM, reset after
the build) while report runs.
Targets (reported, not asserted): report <= 1.5x bare meta and >= 3x faster than MemTracker on every
suite model; a deep model's report <= 1x its bare meta execution. ``--planning`` times the answers built from several estimates (max_batch_size,
fits over the catalog, levers) against one report, with replays and with every estimate traced.

    python benchmarks/speed.py [--quick] [--only NAME[,NAME]] [--markdown] [--repeat 3] [--no-7b] [--planning]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import subprocess
import sys
import time

from common import MiB, header, log, quiet_stderr, short_error, suite_arguments

import torch
from tabulate import tabulate

import memtrace
from memtrace.options import Phase, parse_options
from memtrace.step import run_steps
from models import Case, _tokens, _tv, gpt2, llama_7b, llama_70b, select

STEPS = 2
TARGET_BARE_RATIO = 1.5
TARGET_MEMTRACKER_RATIO = 3.0
TARGET_DEEP_RATIO = 1.0  # report / bare meta execution of a deep model


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def time_report(case: Case, model, repeat: int) -> tuple[float, int]:
    t, rep = best_of(lambda: memtrace.report(model, **case.report_kwargs(), optimizer="adam", steps=STEPS), repeat)
    return t, rep.peak_bytes


def _options(case: Case, model):
    return parse_options(model, **case.report_kwargs(), optimizer="adam", device="cpu", steps=STEPS)


def time_bare_meta(case: Case, repeat: int, factory=None) -> float:
    with torch.device("meta"):
        model = (factory or case.factory)()
    options = _options(case, model)

    def run():
        opt = torch.optim.Adam(model.parameters(), foreach=True)
        inputs = lambda: options.inputs.build(lambda s: torch.empty(s.shape, dtype=s.dtype, device="meta"))
        run_steps(model, options, inputs, opt, None, "cpu")

    t, _ = best_of(run, repeat)
    return t


FAKE_BUILD_FALLBACK: set[str] = set()  # models built on meta + to_empty for (b') and (c)


def fake_model(case: Case):
    """(fake mode, model built under it, how). Building under FakeTensorMode runs the model's init on fake
    tensors; inits that read values (torch.nn.init.trunc_normal_ checks ``mask.any()``) raise there, so
    such models are built on meta and materialised with ``to_empty`` under the fake mode instead."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with fake_mode:
            return fake_mode, case.factory(), "built under FakeTensorMode"
    except DataDependentOutputException:
        FAKE_BUILD_FALLBACK.add(case.name)
        with torch.device("meta"):
            model = case.factory()
        with fake_mode:
            model.to_empty(device="cpu")
        return fake_mode, model, "built on meta, to_empty under FakeTensorMode"


def time_bare_fake(case: Case, repeat: int) -> float:
    fake_mode, model, _ = fake_model(case)
    options = _options(case, model)

    def run():
        with fake_mode:
            opt = torch.optim.Adam(model.parameters(), foreach=True)
            inputs = lambda: options.inputs.build(lambda s: torch.empty(s.shape, dtype=s.dtype))
            run_steps(model, options, inputs, opt, None, "cpu")
            model.zero_grad(set_to_none=True)

    t, _ = best_of(run, repeat)
    return t


def time_memtracker(case: Case, repeat: int) -> tuple[float, int]:
    from torch.distributed._tools.mem_tracker import MemTracker

    fake_mode, model, _ = fake_model(case)
    options = _options(case, model)

    def run():
        with fake_mode:
            opt = torch.optim.Adam(model.parameters(), foreach=True)
            mt = MemTracker()
            mt.track_external(model, opt)
            with mt:
                def on_phase(phase, it):
                    if phase is Phase.FORWARD and it > 0:
                        mt.reset_mod_stats()  # per-module snapshots are per iteration

                inputs = lambda: options.inputs.build(lambda s: torch.empty(s.shape, dtype=s.dtype))
                run_steps(model, options, inputs, opt, None, "cpu", on_phase)
            peak = mt.get_tracker_snapshot("peak")
            model.zero_grad(set_to_none=True)
        return max((snap.get("Total", 0) for snap in peak.values()), default=0)

    return best_of(run, repeat)


def run_case(case: Case, repeat: int) -> dict:
    row = {"model": case.name}
    torch.manual_seed(0)
    with quiet_stderr():
        model = case.factory()
    for key, fn in (
        ("report", lambda: time_report(case, model, repeat)),
        ("bare", lambda: (time_bare_meta(case, repeat), None)),
        ("fake", lambda: (time_bare_fake(case, repeat), None)),
        ("memtracker", lambda: time_memtracker(case, repeat)),
    ):
        try:
            with quiet_stderr():
                row[f"{key}_s"], peak = fn()
            if peak is not None:
                row[f"{key}_peak"] = peak
        except Exception as exc:
            row[f"{key}_error"] = short_error(exc)
        log(f"    {key}: " + (f"{row[f'{key}_s']:.3f}s" if f"{key}_s" in row else f"fails ({row[f'{key}_error']})"))
    return row


# ---- the 7B row, run in a fresh process so that its peak RSS is its own -------------------------------

def _proc_status_bytes(key: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    # VmHWM, not getrusage's ru_maxrss: the child is started with vfork by subprocess, and ru_maxrss keeps
    # the high-water mark of the parent's address space across exec, i.e. the whole benchmark's RSS
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:  # "5" resets the peak RSS to the current RSS (Documentation/filesystems/proc.rst, clear_refs)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


DEEP = {  # name -> (factory, batch, sequence, report options, description)
    "llama_7b": (llama_7b, 1, 2048, {"optimizer": "adamw"},
                 "7B LLaMA (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000), batch 1 x 2048, "
                 "AdamW, float32"),
    "llama_70b": (llama_70b, 1, 4096, {"optimizer": "adamw", "amp": "bf16"},
                  "70B LLaMA (hidden 8192, intermediate 28672, 80 layers, 64 heads / 8 key-value heads, vocab "
                  "32000), batch 1 x 4096, AdamW, bf16 AMP"),
    "llama_70b_fsdp64": (llama_70b, 1, 4096, {"optimizer": "adamw", "amp": "bf16", "parallel": {"fsdp": 64}},
                         "the same 70B, one rank of FSDP2 over 64 GPUs (each layer a unit)"),
}


def deep_child(name: str, repeat: int) -> dict:
    """One deep model in this (fresh) process: report (its layers spliced from traces of 2, 3 and 4), the
    same report with every layer traced, and bare meta execution of the same steps."""
    from memtrace import depth

    factory, batch, seq, options, _ = DEEP[name]
    t = time.perf_counter()
    with torch.device("meta"):
        model = factory()
    build_s = time.perf_counter() - t
    inputs = _tokens(batch, seq)
    gc.collect()
    out = {"params": sum(p.numel() for p in model.parameters()), "build_s": build_s,
           "rss_before_bytes": _proc_status_bytes("VmRSS") or 0, "peak_rss_reset": _reset_peak_rss()}
    call = lambda: memtrace.report(model, inputs=inputs, steps=STEPS, **options)  # noqa: E731
    try:
        with quiet_stderr():
            t, rep = best_of(call, repeat)
        out["rss_peak_bytes"] = _peak_rss_bytes()
        out.update(report_s=t, peak_bytes=rep.peak_bytes, traced_ops=rep.traced_ops,
                   peak_phase=f"{rep.peak.phase.value} (it {rep.peak.iteration})")
        depth.ENABLED = False
        with quiet_stderr():
            t, whole = best_of(call, 1)
        depth.ENABLED = True
        out.update(whole_s=t, same_json=whole.to_json() == rep.to_json())
    except Exception as exc:
        out["report_error"] = short_error(exc)
    try:
        case = Case(name, factory, inputs)
        with quiet_stderr():
            out["bare_s"] = time_bare_meta(case, repeat)
    except Exception as exc:
        out["bare_error"] = short_error(exc)
    return out


def deep(name: str, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--deep-child", name, "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"report_error": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}


def deep_table(rows: dict, markdown: bool) -> str:
    out = []
    for name, r in rows.items():
        if "report_s" not in r:
            out.append([name, f"fails ({r.get('report_error')})"] + [""] * 10)
            continue
        bare = r.get("bare_s")
        ratio = r["report_s"] / bare if bare else None
        out.append([
            name, f"{r['params'] / 1e9:.2f} B", f"{r['report_s']:.2f}", f"{r['whole_s']:.2f}",
            f"{bare:.2f}" if bare else f"fails ({r.get('bare_error', '?')})",
            f"{ratio:.2f}" if ratio else "-", f"{r['whole_s'] / bare:.2f}" if bare else "-",
            "yes" if r["same_json"] else "NO", f"{r['peak_bytes'] / 2**30:.2f}", str(r["traced_ops"]),
            f"{r['rss_before_bytes'] / MiB:.0f}", f"{r['rss_peak_bytes'] / MiB:.0f}"
            + ("" if r.get("peak_rss_reset") else " (since start)"),
            "-" if ratio is None else "met" if ratio <= TARGET_DEEP_RATIO else "NOT met",
        ])
    return tabulate(out, headers=["model", "params", "report s", "every layer traced s", "bare meta s",
                                  "report / bare", "every layer / bare", "same report", "peak GiB",
                                  "traced ops", "RSS before MiB", "peak RSS in report MiB",
                                  f"report <= {TARGET_DEEP_RATIO:g}x bare"],
                    tablefmt="github" if markdown else "simple", disable_numparse=True)


# ---- answers built from several estimates -------------------------------------------------------------

TARGET_PLANNING = {"max_batch_size": 1.5, "fits": 3.0, "levers": 3.0}


@contextlib.contextmanager
def _traces_only():
    """Planning answers with every estimate traced, as before replays: the baseline of the same run."""
    from memtrace import planning

    init = planning.Estimates.__init__

    def traced_only(self, *args, replay=True, **kwargs):
        init(self, *args, replay=False, **kwargs)

    planning.Estimates.__init__ = traced_only
    try:
        yield
    finally:
        planning.Estimates.__init__ = init


def _cold(call):
    """``call`` with FakeTensorMode's dispatch cache emptied first: an answer run after another at the same
    batch sizes would find the shapes cached."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        FakeTensorMode.cache_clear()
        return call()
    return run


def planning_rows() -> list[dict]:
    """Each answer's time against one report of the same step, with replays and with traces only, each
    from an empty FakeTensorMode cache."""
    rows = []
    for name, factory, kwargs, gpu in (("resnet50", _tv("resnet50"), {"input_shape": (32, 3, 224, 224)}, "A5000"),
                                       ("gpt2", gpt2, {"inputs": _tokens(4, 256)}, "A5000")):
        model = factory()
        with quiet_stderr():
            one, _ = best_of(_cold(lambda: memtrace.report(model, **kwargs, gpu=gpu)), 2)
            answers = (
                ("max_batch_size", lambda: memtrace.max_batch_size(model, **kwargs, gpu=gpu)),
                ("fits", lambda: memtrace.fits(model, **kwargs)),
                ("levers", lambda: memtrace.levers(model, **_bigger(kwargs, 16), gpu=gpu)),
            )
            for answer, call in answers:
                row = {"model": name, "answer": answer, "report_s": one}
                for how in ("replays", "traces"):
                    with (_traces_only() if how == "traces" else contextlib.nullcontext()):
                        t, result = best_of(_cold(call), 1)
                    row[f"{how}_s"], row[f"{how}_result"] = t, _answer_text(result)
                    row[f"{how}_estimates"] = getattr(result, "estimates", None)
                rows.append(row)
    return rows


def _bigger(kwargs: dict, factor: int) -> dict:
    """The same inputs at ``factor`` times the batch (a step that does not fit, for levers)."""
    if "input_shape" in kwargs:
        shape = kwargs["input_shape"]
        return {"input_shape": (shape[0] * factor, *shape[1:])}
    return {"inputs": {k: torch.empty((t.shape[0] * factor, *t.shape[1:]), dtype=t.dtype, device="meta")
                       for k, t in kwargs["inputs"].items()}}


def _answer_text(result) -> str:
    if isinstance(result, memtrace.MaxBatch):
        return str(result.batch_size)
    if isinstance(result, memtrace.FitTable):
        return "/".join(str(r.largest.batch_size) for r in result.rows)
    return "; ".join(f"{lv.label}: {lv.report.peak_bytes}" for lv in result.levers)


def planning_table(rows: list[dict], markdown: bool) -> str:
    out = []
    for r in rows:
        target = TARGET_PLANNING[r["answer"]]
        ratio = r["replays_s"] / r["report_s"]
        out.append([r["model"], r["answer"], f"{r['report_s']:.2f}", f"{r['traces_s']:.2f}",
                    f"{r['traces_s'] / r['report_s']:.1f}", f"{r['replays_s']:.2f}", f"{ratio:.1f}",
                    f"≤ {target:g}: {'met' if ratio <= target else 'NOT met'}",
                    "same" if r["replays_result"] == r["traces_result"] else "DIFFERENT"])
    headers = ["model", "answer", "one report s", "traces only s", "/ report", "with replays s", "/ report",
               "target", "answer vs traces only"]
    return tabulate(out, headers=headers, tablefmt="github" if markdown else "simple", disable_numparse=True,
                    colalign=("left", "left") + ("right",) * 5 + ("left", "left"))


# ---- presentation ------------------------------------------------------------------------------------

def _s(row: dict, key: str) -> str:
    if f"{key}_s" in row:
        return f"{row[f'{key}_s']:.3f}"
    return f"fails ({row[f'{key}_error'].split(':')[0]})" if f"{key}_error" in row else "-"


def table(rows: list[dict], markdown: bool) -> str:
    out = []
    for r in rows:
        rb = r["report_s"] / r["bare_s"] if "report_s" in r and "bare_s" in r else None
        mr = r["memtracker_s"] / r["report_s"] if "report_s" in r and "memtracker_s" in r else None
        out.append([
            r["model"], _s(r, "report"), _s(r, "bare"), _s(r, "memtracker"),
            f"{rb:.2f}" if rb is not None else "-", f"{mr:.2f}" if mr is not None else "-",
            _s(r, "fake"), f"{r['report_s'] / r['fake_s']:.2f}" if "report_s" in r and "fake_s" in r else "-",
            f"{r['report_peak'] / MiB:.2f}" if "report_peak" in r else "-",
            f"{r['memtracker_peak'] / MiB:.2f}" if "memtracker_peak" in r else "-",
        ])
    headers = ["model", "report s", "bare meta s", "MemTracker s", "report/bare", "MemTracker/report",
               "bare fake s", "report/fake", "report peak MiB (cuda)", "MemTracker peak MiB (fake cpu)"]
    return tabulate(out, headers=headers, tablefmt="github" if markdown else "simple", disable_numparse=True,
                    colalign=("left",) + ("right",) * 9)


def summary(rows: list[dict]) -> list[str]:
    rb = [(r["report_s"] / r["bare_s"], r["model"]) for r in rows if "report_s" in r and "bare_s" in r]
    mr = [(r["memtracker_s"] / r["report_s"], r["model"]) for r in rows if "report_s" in r and "memtracker_s" in r]
    lines = []
    if rb:
        worst = max(rb)
        lines.append(f"report/bare meta: max {worst[0]:.2f}x ({worst[1]}); <= {TARGET_BARE_RATIO}x on "
                     f"{sum(x <= TARGET_BARE_RATIO for x, _ in rb)}/{len(rb)} models")
    if mr:
        worst = min(mr)
        lines.append(f"MemTracker/report: min {worst[0]:.2f}x ({worst[1]}); >= {TARGET_MEMTRACKER_RATIO}x on "
                     f"{sum(x >= TARGET_MEMTRACKER_RATIO for x, _ in mr)}/{len(mr)} models")
    fallback = [r["model"] for r in rows if r["model"] in FAKE_BUILD_FALLBACK]
    if fallback:
        lines.append(f"{', '.join(fallback)}: their init reads tensor values (trunc_normal_), which fails under "
                     "FakeTensorMode, so for bare fake and MemTracker they were built on meta and materialised "
                     "with to_empty(device='cpu') under the fake mode")
    for r in rows:
        for key in ("report", "bare", "fake", "memtracker"):
            if f"{key}_error" in r:
                lines.append(f"{r['model']}: {key} fails: {r[f'{key}_error']}")
    return lines


def main(argv=None) -> int:
    ap = suite_arguments(__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    ap.add_argument("--no-7b", action="store_true", help="skip the deep models (7B and 70B LLaMA)")
    ap.add_argument("--only-7b", action="store_true", help="only the deep models (7B and 70B LLaMA)")
    ap.add_argument("--planning", action="store_true",
                    help="only the answers (max_batch_size, fits, levers) against one report")
    ap.add_argument("--deep-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.deep_child:
        print(json.dumps(deep_child(args.deep_child, args.repeat)))
        return 0

    start = time.perf_counter()
    for line in header():
        print(line)
    if args.planning:
        print("answers: each once, with replays (the default) and with every estimate traced, against the best "
              "of 2 reports of the same step, each from an empty FakeTensorMode cache (device='cuda', "
              "gpu='A5000'; fits over the whole catalog; levers at 16 times the batch)")
        print()
        print(planning_table(planning_rows(), args.markdown))
        print(f"\nwall time: {time.perf_counter() - start:.1f} s")
        return 0
    cases = [] if args.only_7b else select(args.only, args.quick)
    print(f"speed: {len(cases)} models, {STEPS} training steps, Adam, best of {args.repeat}; report is "
          "device='cuda' (traced on fake CPU tensors); MemTracker runs on fake CPU tensors; model building "
          "is not timed for bare meta and MemTracker, report's own fake copy is")
    print(flush=True)
    rows = []
    for case in cases:
        log(f"[{time.perf_counter() - start:6.1f}s] {case.name} ...")
        rows.append(run_case(case, args.repeat))
    if rows:
        print(table(rows, args.markdown))
        print()
        for line in summary(rows):
            print(line)
    if not args.no_7b:
        deep_rows = {}
        for name in (["llama_7b"] if args.quick else list(DEEP)):
            log(f"[{time.perf_counter() - start:6.1f}s] {name} (subprocess) ...")
            deep_rows[name] = deep(name, args.repeat)
        print()
        print(f"Deep models, built on meta, {STEPS} steps, device='cuda', best of {args.repeat} (every layer "
              "traced: once), each in a fresh process:")
        for name in deep_rows:
            print(f"- {name}: {DEEP[name][4]}")
        print(deep_table(deep_rows, args.markdown))
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
