"""Helpers shared by the benchmark scripts: paths, the environment header, quieting C++ chatter."""

from __future__ import annotations

import contextlib
import datetime
import gzip
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MiB = 1024 * 1024

# name -> (optimizer, optimizer_kwargs) as passed to memtrace.report / measure_cpu
OPTIMIZERS = {
    "adam": ("adam", None),
    "sgd": ("sgd", {"lr": 0.01, "momentum": 0.9}),
    "adamw": ("adamw", None),
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


def header() -> list[str]:
    import torch

    lines = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"CPUs: {os.cpu_count()} (torch threads {torch.get_num_threads()}), "
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    versions = []
    for mod in ("torchvision", "transformers"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            pass
    dirty = " (uncommitted changes)" if _git("status", "--porcelain", "--", "memtrace") else ""
    lines.append(", ".join(versions) + f"; memtrace commit {_git('rev-parse', '--short', 'HEAD')}{dirty}")
    lines.append(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    return lines


@contextlib.contextmanager
def quiet_stderr():
    """Silence fd 2 (the profiler's kineto lines, CUDA probing errors) while the block runs; on an
    exception the captured text is written back so nothing useful is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def suite_arguments(description: str):
    """The command-line options every suite benchmark shares."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated case names (see benchmarks/models.py)")
    ap.add_argument("--quick", action="store_true", help="a small subset of the suite")
    ap.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    return ap


def start_allocator_trace() -> None:
    """Record the CUDA caching allocator's events from now on, without stacks, dropping earlier ones."""
    import torch

    try:
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", clear_history=True)
    except TypeError:  # before clear_history: a stopped recording starts afresh
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python")


def stop_allocator_trace() -> list[tuple[str, int, int]]:
    """The events since start_allocator_trace() as (action, size, address); stops recording."""
    import torch

    events = [(e["action"], e["size"], e["addr"]) for e in torch.cuda.memory._snapshot()["device_traces"][0]]
    torch.cuda.memory._record_memory_history(enabled=None)
    return events


def save_traces(stem: str, events: list, report, **about) -> None:
    """``stem.real.pkl.gz`` (the real run's allocator events and ``about`` it) and ``stem.predicted.pkl.gz``
    (the report's snapshot), as benchmarks/trace_diff.py reads them."""
    from memtrace.snapshot import snapshot

    with gzip.open(stem + ".real.pkl.gz", "wb") as f:
        pickle.dump({"events": events, **about}, f)
    with gzip.open(stem + ".predicted.pkl.gz", "wb") as f:
        pickle.dump(snapshot(report), f)
