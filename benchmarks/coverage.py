"""Coverage: on how many real models of the public zoos memtrace estimates a training step, and why it fails
on the others.

Every model of torchvision (classification, segmentation, video, optical flow, and the detectors trained with
targets), every Hugging Face transformers architecture with a causal-LM, masked-LM, seq2seq or
image-classification head (built from its configuration, shrunk to a tiny size), and one small timm model per
family (when timm is installed) is built from code, without weights (benchmarks/coverage_models.py), and
``memtrace.report(model, inputs=..., optimizer="adam", device="cpu")`` estimates one training step of it, in
a child process with a time limit (--timeout).

Where memtrace fails, the same step (forward, loss, backward, Adam step, two iterations, as memtrace traces
it) runs for real in plain PyTorch on the CPU, also in a child process with a time limit (--real-timeout),
to tell whose fault the failure is:

    ok              memtrace estimated the step
    memtrace fault  memtrace failed (or ran out of time) and the real step runs
    model fault     the model cannot be built, or its real step fails as well
    wrong           memtrace estimated a step that fails for real (such as an in-place modification that
                    autograd refuses in backward): found by running the real step of the models memtrace
                    estimated, all of them with --check-all (about twice the time), else a cheap sample
                    (--sample per family)
    undecided       memtrace failed and the real step ran out of time or crashed

The loss of the real step is ``output.loss`` when the model returns one, the sum of a dict of scalar losses
(torchvision's detectors), else the mean of the first floating-point tensor of the output; memtrace's default
loss is the same. The tables: ok / total per family, then the failures grouped by cause (the first line of
the exception, with numbers and addresses normalised so that similar errors group), each with its models.

Models run in a small pool of long-lived worker processes (--jobs, 2 by default; each imports torch and the
zoos once and handles many models); a worker that runs past its time limit is killed and replaced. The memtrace
package is copied to a temporary folder when the survey starts and the workers import that copy, so that
edits to the checkout made while the survey runs do not mix two versions of memtrace into one survey.

    python benchmarks/coverage.py                          # every family, about 30-60 min on 2 cores
    python benchmarks/coverage.py --limit 3                # the first 3 models of each family
    python benchmarks/coverage.py --families hf-causal-lm,timm --check-all --json rows.json
    python benchmarks/coverage.py --only rcnn --families torchvision   # families by prefix too
    python benchmarks/coverage.py --device cuda            # predict the CUDA target instead (no GPU needed)

Families: torchvision-classification, torchvision-segmentation, torchvision-video,
torchvision-optical-flow, torchvision-detection, hf-causal-lm, hf-masked-lm, hf-seq2seq,
hf-image-classification, timm.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait

from common import ROOT, header, log

from tabulate import tabulate

import coverage_models

STEPS = 2  # iterations of the real step, as memtrace.report traces by default
CHEAP_PARAMS = 50_000_000  # models sampled for a real check without --check-all have at most this many
HEAVY_PARAMS = 200_000_000  # real steps of models this large (GBs of weights and Adam state) run one at a time


# ---- inside a worker ---------------------------------------------------------------------------------------

def call_model(model, inputs):
    """Call ``model`` as ``memtrace.report(inputs=...)`` does: a dict is keyword arguments, a tuple or list
    positional arguments, anything else the one positional argument."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict) or (hasattr(obj, "values") and hasattr(obj, "keys")):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from _tensors(value)


def default_loss(output):
    """``output.loss``; else the sum of a dict of scalar losses; else the mean of the first floating-point
    tensor of the output."""
    import torch

    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, dict):
        if isinstance(output.get("loss"), torch.Tensor):
            return output["loss"]
        values = list(output.values())
        if values and all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() for v in values):
            return sum(values)
    for tensor in _tensors(output):
        if tensor.is_floating_point():
            return tensor.float().mean()
    raise ValueError("the model's output holds no floating-point tensor to reduce into a loss")


def real_step(model, inputs) -> None:
    """``STEPS`` real training iterations in plain PyTorch: forward, loss, backward, Adam step, zero_grad."""
    import torch

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    for _ in range(STEPS):
        loss = default_loss(call_model(model, inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _frame(frame) -> str:
    path = frame.filename
    marker = f"{os.sep}memtrace{os.sep}"
    if marker in path:  # the checkout's package or the survey's copy of it
        path = "memtrace" + os.sep + path.split(marker, 1)[1]
    for prefix in ("site-packages" + os.sep, ROOT + os.sep):
        if prefix in path:
            path = path.split(prefix, 1)[1]
    return f"{path}:{frame.lineno} ({frame.name})"


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from (or while handling), outermost first."""
    chain = [exc]
    while len(chain) < 8:
        inner = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if inner is None or inner in chain:
            break
        chain.append(inner)
    return chain


def _is_library(path: str) -> bool:
    return any(f"{os.sep}{part}{os.sep}" in path for part in ("torch", "memtrace"))


def error_info(exc: BaseException) -> dict:
    """The exception's first line; where the original error (the innermost of the chain) was raised, as the
    innermost frame outside torch and memtrace (the model's code) and as the innermost frame inside
    memtrace; the original error's first line; and the end of the traceback."""
    chain = _chain(exc)
    origin = next((e for e in reversed(chain) if e.__traceback__ is not None), exc)
    frames = traceback.extract_tb(origin.__traceback__)
    model_frames = [f for f in frames if not _is_library(f.filename)] or frames
    ours = [f for e in reversed(chain) for f in reversed(traceback.extract_tb(e.__traceback__))
            if f"{os.sep}memtrace{os.sep}" in f.filename]
    info = {"error": first_line(exc), "where": _frame(model_frames[-1]) if model_frames else "",
            "memtrace_where": _frame(ours[0]) if ours else "",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]}
    if origin is not exc:
        info["original_error"] = first_line(origin)
    return info


def run_task(task: dict) -> dict:
    """Build the model and run one task on it: ``report`` (memtrace's estimate) or ``real`` (the step)."""
    import torch

    import memtrace

    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        model, inputs = coverage_models.build(task["family"], task["name"])
    except Exception as exc:
        return {"ok": False, "stage": "build", **error_info(exc), "seconds": time.perf_counter() - start}
    result = {"params": coverage_models.parameter_count(model), "inputs": coverage_models.describe_inputs(inputs)}
    build_s = time.perf_counter() - start
    try:
        if task["kind"] == "report":
            report = memtrace.report(model, inputs=inputs, optimizer="adam", device=task["device"])
            result.update(peak_bytes=report.peak_bytes, peak_phase=report.peak.phase.value)
        else:
            real_step(model, inputs)
        result["ok"] = True
    except Exception as exc:
        result.update(ok=False, stage=task["kind"], **error_info(exc))
    result["build_seconds"] = build_s
    result["seconds"] = time.perf_counter() - start
    return result


def worker_main(conn, threads: int, preload: list[str], memtrace_dir: str | None) -> None:
    """A worker: imports once, then runs tasks from ``conn`` until it receives None."""
    devnull = os.open(os.devnull, os.O_WRONLY)  # models and libraries print; the results go through conn
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if memtrace_dir:
        sys.path.insert(0, memtrace_dir)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    import memtrace  # noqa: F401

    for module in preload:
        try:
            __import__(module)
        except Exception:
            pass
    conn.send({"ready": True, "memtrace": memtrace.__file__})
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(run_task(task))


# ---- the pool ----------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, ctx, threads: int, preload: list[str], memtrace_dir: str | None):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, threads, preload, memtrace_dir), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: dict | None = None
        self.deadline = 0.0
        self.started = 0.0
        self.done = 0

    def assign(self, task: dict, timeout: float) -> None:
        self.task, self.started, self.deadline = task, time.perf_counter(), time.perf_counter() + timeout
        self.conn.send(task)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(10)
        self.kill()


class Pool:
    """``jobs`` long-lived workers running tasks with a time limit each; a worker that runs past its limit,
    or dies, is replaced. A worker is also replaced after ``max_tasks`` tasks, which bounds the memory that
    large models leave behind in it."""

    def __init__(self, jobs: int, timeouts: dict[str, float], preload: list[str], memtrace_dir: str | None,
                 max_tasks: int = 40):
        self.ctx = multiprocessing.get_context("spawn")
        self.timeouts, self.preload, self.memtrace_dir, self.max_tasks = timeouts, preload, memtrace_dir, max_tasks
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.workers = [self._new() for _ in range(jobs)]
        self.memtrace_file = None

    def _new(self) -> Worker:
        return Worker(self.ctx, self.threads, self.preload, self.memtrace_dir)

    def _replace(self, worker: Worker) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = self._new()

    def run(self, queue: collections.deque, on_result) -> None:
        """Run the tasks of ``queue`` (more may be added by ``on_result(task, result)``) until none is left."""
        while queue or any(w.task for w in self.workers):
            for worker in self.workers:
                if worker.ready and worker.task is None and queue:
                    task = self._next(queue)
                    if task is not None:
                        worker.assign(task, self.timeouts[task["kind"]])
            waiting = {w.conn: w for w in self.workers}
            busy = [w.deadline for w in self.workers if w.task]
            limit = max(0.1, min(busy) - time.perf_counter()) if busy else 1.0
            for conn in wait(list(waiting), timeout=limit):
                worker = waiting[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._died(worker, on_result)
                    continue
                if message.get("ready"):
                    worker.ready = True
                    self.memtrace_file = message.get("memtrace")
                    continue
                task, worker.task = worker.task, None
                worker.done += 1
                if worker.done >= self.max_tasks:
                    worker.stop()
                    self.workers[self.workers.index(worker)] = self._new()
                on_result(task, message)
            now = time.perf_counter()
            for worker in list(self.workers):
                if worker.task and now > worker.deadline:
                    task = worker.task
                    self._replace(worker)
                    on_result(task, {"ok": False, "stage": task["kind"], "timeout": True,
                                     "error": f"timeout: no result within {self.timeouts[task['kind']]:g} s",
                                     "seconds": now - worker.started})

    def _next(self, queue: collections.deque) -> dict | None:
        """The first task of the queue that may start now: a heavy real step waits for another to end."""
        heavy_running = any(w.task and w.task.get("heavy") for w in self.workers)
        for i, task in enumerate(queue):
            if not (task.get("heavy") and heavy_running):
                del queue[i]
                return task
        return None

    def _died(self, worker: Worker, on_result) -> None:
        task = worker.task
        worker.process.join(5)
        code = worker.process.exitcode
        if not worker.ready:
            raise RuntimeError(f"a worker process failed to start (exit code {code})")
        self._replace(worker)
        if task is not None:
            why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            on_result(task, {"ok": False, "stage": task["kind"], "crashed": True,
                             "error": f"worker died ({why}){' - out of memory?' if code == -9 else ''}",
                             "seconds": time.perf_counter() - worker.started})

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


# ---- the survey --------------------------------------------------------------------------------------------

class Survey:
    """The models' rows, updated as results come in; decides which models get a real step."""

    def __init__(self, models: list[tuple[str, str]], device: str, check_all: bool, sample: int):
        self.rows = {(f, n): {"family": f, "model": n} for f, n in models}
        self.device, self.check_all, self.sample = device, check_all, sample
        self.sampled = collections.Counter()
        self.queue = collections.deque({"kind": "report", "family": f, "name": n, "device": device}
                                       for f, n in models)
        self.start = time.perf_counter()
        self.finished = 0

    def on_result(self, task: dict, result: dict) -> None:
        row = self.rows[(task["family"], task["name"])]
        row[task["kind"]] = result
        for key in ("params", "inputs"):
            if key in result:
                row[key] = result[key]
        if task["kind"] == "report" and self._wants_real_step(row):
            heavy = (row.get("params") or 0) > HEAVY_PARAMS
            self.queue.appendleft({**task, "kind": "real", "heavy": heavy})  # soon, while the report is fresh
        else:
            self.finished += 1
            row["status"] = status(row)
            log(f"[{time.perf_counter() - self.start:7.1f}s] {self.finished}/{len(self.rows)} "
                f"{row['family']}/{row['model']}: {row['status']}{_detail(row)}")

    def _wants_real_step(self, row: dict) -> bool:
        report = row["report"]
        if report.get("stage") == "build":
            return False  # the model cannot be built: nothing to run
        if not report["ok"] or self.check_all:
            return True
        if self.sampled[row["family"]] < self.sample and (row.get("params") or 0) <= CHEAP_PARAMS:
            self.sampled[row["family"]] += 1
            return True
        return False

    def ordered_rows(self) -> list[dict]:
        return list(self.rows.values())


def status(row: dict) -> str:
    report, real = row.get("report"), row.get("real")
    if report is None:
        return "not run"
    if report.get("stage") == "build":
        return "model fault"
    if report["ok"]:
        return "wrong" if real is not None and not real["ok"] and not _inconclusive(real) else "ok"
    if real is None:
        return "undecided"
    if real["ok"]:
        return "memtrace fault"
    return "undecided" if _inconclusive(real) else "model fault"


def _inconclusive(result: dict) -> bool:
    return bool(result.get("timeout") or result.get("crashed"))


def _detail(row: dict) -> str:
    report, real = row.get("report", {}), row.get("real")
    if row["status"] == "ok":
        checked = " (real step ok)" if real and real["ok"] else ""
        return f" - {report['peak_bytes'] / 2**20:.1f} MiB in {report['seconds']:.1f} s{checked}"
    failed = report if not report.get("ok") else real
    return f" - {failed.get('error', '')[:150]}"


# ---- tables ------------------------------------------------------------------------------------------------

def normalise(message: str) -> str:
    """The error line with addresses, numbers and quoted tensor shapes made generic, so that similar
    failures of different models group."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", message)
    text = re.sub(r" \([A-Za-z_]\w*, input shapes [^)]*\)", "", text)  # memtrace's module, class and shapes
    text = re.sub(r"in module '[^']*'", "in module M", text)
    text = re.sub(r"data_dependent=\{[^}]*\}", "data_dependent={...}", text)
    text = re.sub(r"(?<![A-Za-z_\d])-?\d+(\.\d+)?(e-?\d+)?", "N", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= 220 else text[:217] + "..."


def failure(row: dict) -> dict:
    """The failure that decides the row's status: memtrace's for memtrace faults and undecided rows, the
    real step's for model faults (the build's when it failed) and wrong rows."""
    if row["status"] in ("memtrace fault", "undecided"):
        return row["report"]
    if row["status"] == "wrong":
        return row["real"]
    if row["status"] == "model fault":
        return row["real"] if row.get("real") else row["report"]
    return {}


def family_table(rows: list[dict], families: list[str], fmt: str) -> str:
    body = []
    for family in families + ["total"]:
        mine = [r for r in rows if family in ("total", r["family"])]
        if not mine:
            continue
        counts = collections.Counter(r["status"] for r in mine)
        checked = sum(1 for r in mine if r.get("real"))
        runnable = len(mine) - counts["model fault"]
        share = f"{100 * counts['ok'] / runnable:.0f}%" if runnable else "-"
        body.append([family, f"{counts['ok']}/{len(mine)}", counts["memtrace fault"], counts["model fault"],
                     counts["wrong"], counts["undecided"], checked, share])
    headers = ["family", "ok / total", "memtrace fault", "model fault", "wrong", "undecided", "real steps run",
               "ok / runnable"]
    return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True,
                    colalign=("left",) + ("right",) * 7)


def group_table(rows: list[dict], wanted: str, fmt: str, wrap: bool) -> str:
    """One row per cause: how many models, the first model's error line, where it was raised (and, for
    memtrace's faults, the innermost memtrace frame) and the models, by family."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        if row["status"] == wanted:
            groups[normalise(failure(row).get("error", "?"))].append(row)
    body = []
    for cause, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        by_family = collections.defaultdict(list)
        for r in members:
            by_family[r["family"]].append(r["model"])
        models = "; ".join(f"{f}: {', '.join(names)}" for f, names in by_family.items())
        first = failure(members[0])
        line = [len(members), first.get("error", "?"), first.get("where", "")]
        if wanted == "memtrace fault":
            line.append(first.get("memtrace_where", ""))
        body.append(line + [models])
    headers = ["n", "error (first model's)", "raised in (the model's code)"]
    headers += ["memtrace frame"] if wanted == "memtrace fault" else []
    headers += ["models"]
    widths = ([None, 70, 40] + ([35] if wanted == "memtrace fault" else []) + [60]) if wrap else None
    return tabulate(body, headers=headers, tablefmt=fmt, maxcolwidths=widths, disable_numparse=True)


def wrong_table(rows: list[dict], fmt: str, wrap: bool) -> str:
    body = [[f"{r['family']}/{r['model']}", f"{r['report']['peak_bytes'] / 2**20:.1f}", r["real"].get("error", "?"),
             r["real"].get("where", "")] for r in rows if r["status"] == "wrong"]
    return tabulate(body, headers=["model", "memtrace peak MiB", "the real step's error", "where"], tablefmt=fmt,
                    maxcolwidths=[40, None, 70, 45] if wrap else None, disable_numparse=True)


def print_results(rows: list[dict], families: list[str], args, wall: float) -> None:
    fmt = "github" if args.markdown else "simple"
    wrap = not args.markdown
    print(family_table(rows, families, fmt))
    print()
    sections = [("memtrace fault", "memtrace faults (memtrace fails, the real step runs), by cause"),
                ("wrong", None),
                ("undecided", "undecided (memtrace fails, the real step ran out of time or crashed), by cause"),
                ("model fault", "model faults (the model cannot be built, or its real step fails too), by cause")]
    for wanted, title in sections:
        if not any(r["status"] == wanted for r in rows):
            continue
        if wanted == "wrong":
            print("wrong: memtrace estimated a step that fails for real")
            print(wrong_table(rows, fmt, wrap))
        else:
            print(title)
            print(group_table(rows, wanted, fmt, wrap))
        print()
    checked = sum(1 for r in rows if r["status"] in ("ok", "wrong") and r.get("real"))
    estimated = sum(1 for r in rows if r["status"] in ("ok", "wrong"))
    print(f"real steps run for {checked} of the {estimated} models memtrace estimated"
          f"{' (--check-all)' if args.check_all else f' (a sample of up to {args.sample} per family; --check-all for all)'}")
    print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min), {args.jobs} workers; time limits per model: memtrace "
          f"{args.timeout:g} s, real step {args.real_timeout:g} s")


# ---- main --------------------------------------------------------------------------------------------------

def select_families(spec: str | None, ap) -> list[str]:
    families = list(coverage_models.FAMILIES)
    if not spec:
        return families
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = [f for f in families if f == item or f.startswith(item + "-") or f.startswith(item)]
        if not matches:
            ap.error(f"--families: unknown {item!r}; valid: {', '.join(families)} (or a prefix: torchvision, hf)")
        chosen += [f for f in matches if f not in chosen]
    return chosen


def select_models(families: list[str], only: str | None, limit: int | None) -> list[tuple[str, str]]:
    subs = [s.strip() for s in only.split(",")] if only else None
    models = []
    for family in families:
        names = coverage_models.family_models(family)
        if subs:
            names = [n for n in names if any(s in n for s in subs)]
        models += [(family, n) for n in names[:limit]]
    return models


def preload_modules(families: list[str]) -> list[str]:
    modules = []
    if any(f.startswith("torchvision") for f in families):
        modules.append("torchvision")
    if any(f.startswith("hf") for f in families):
        modules.append("transformers")
    if "timm" in families:
        modules.append("timm")
    return modules


def frozen_memtrace() -> tuple[str, str]:
    """A copy of the memtrace package in a temporary folder, and a digest of its sources."""
    folder = tempfile.mkdtemp(prefix="memtrace-coverage-")
    shutil.copytree(os.path.join(ROOT, "memtrace"), os.path.join(folder, "memtrace"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for base, _, files in sorted(os.walk(os.path.join(folder, "memtrace"))):
        for name in sorted(files):
            with open(os.path.join(base, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return folder, digest.hexdigest()[:12]


def reprint(path: str, markdown: bool) -> int:
    with open(path) as f:
        saved = json.load(f)
    args = argparse.Namespace(**{**saved["args"], "markdown": markdown})
    for line in saved["header"]:
        print(line)
    print(f"memtrace sources {saved['memtrace_sources']}; saved in {path}")
    print()
    rows = [r for r in saved["rows"] if r.get("status", "not run") != "not run"]
    families = list(dict.fromkeys(r["family"] for r in saved["rows"]))
    print_results(rows, families, args, saved["wall_seconds"])
    return 0


class _Stopped(BaseException):
    pass


def _stop(signum, frame):
    raise _Stopped()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", help="comma-separated families or prefixes (default: all)")
    ap.add_argument("--only", help="models whose name contains this (comma-separated: any of them)")
    ap.add_argument("--limit", type=int, help="the first N models of each family")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="the device memtrace predicts for (the real step always runs on the CPU)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for memtrace per model (default 120)")
    ap.add_argument("--real-timeout", type=float, default=300.0,
                    help="seconds for the real step per model (default 300: the largest models take minutes "
                         "on one core)")
    ap.add_argument("--check-all", action="store_true",
                    help="also run the real step of every model memtrace estimates, to find wrong estimates")
    ap.add_argument("--sample", type=int, default=2,
                    help="without --check-all: real steps of up to N estimated models per family (default 2)")
    ap.add_argument("--no-freeze", action="store_true",
                    help="workers import memtrace from the checkout instead of a copy made at the start")
    ap.add_argument("--json", help="save the rows (with each failure's traceback) to this file")
    ap.add_argument("--markdown", action="store_true", help="print the tables as GitHub markdown")
    ap.add_argument("--from-json", metavar="PATH", help="print the tables of a run saved with --json, running nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        return reprint(args.from_json, args.markdown)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")

    families = select_families(args.families, ap)
    models = select_models(families, args.only, args.limit)
    if not models:
        ap.error("no model matches")
    memtrace_dir, digest = (None, "checkout") if args.no_freeze else frozen_memtrace()
    for line in header():
        print(line)
    try:
        import timm

        print(f"timm {timm.__version__}")
    except ImportError:
        print("timm not installed: its family is empty")
    print(f"coverage: memtrace.report(inputs=..., optimizer='adam', device={args.device!r}) on {len(models)} models "
          f"of {len({f for f, _ in models})} families; memtrace sources {digest}; real steps: plain PyTorch on the CPU, "
          f"{STEPS} iterations, Adam")
    print(flush=True)

    survey = Survey(models, args.device, args.check_all, args.sample)
    pool = Pool(args.jobs, {"report": args.timeout, "real": args.real_timeout}, preload_modules(families),
                memtrace_dir)
    signal.signal(signal.SIGTERM, _stop)
    stopped = False
    try:
        pool.run(survey.queue, survey.on_result)
    except (KeyboardInterrupt, _Stopped):
        stopped = True
    finally:
        pool.close()
        if memtrace_dir:
            shutil.rmtree(memtrace_dir, ignore_errors=True)
    rows = survey.ordered_rows()
    for row in rows:
        row.setdefault("status", status(row))
    done = [r for r in rows if r["status"] != "not run"]
    if stopped:
        print(f"stopped after {len(done)} of {len(rows)} models\n")
    wall = time.perf_counter() - survey.start
    print_results(done, families, args, wall)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header(), "args": vars(args), "memtrace_sources": digest, "wall_seconds": wall,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
