"""Regenerates every example output shown in README.md and docs/*.md from the code that prints it.

In the Markdown, each shown output is one fenced block between two markers::

    <!-- example: NAME -->
    ```console
    ...
    ```
    <!-- /example -->

and this file has one function per NAME that runs the real code (``memtrace.report(...).table()``, the
command through ``memtrace.cli.main``, pytest in a temporary directory, ...) and returns the text. The
fence's first line is kept as written; what is inside it is the function's text.

    python docs/examples.py                 rewrite every block in place
    python docs/examples.py --check         exit 1, with a unified diff, where a block differs from what
                                            the code prints now (nothing is written)
    python docs/examples.py --only NAME     only these examples (repeat it, or separate names by commas)
    python docs/examples.py --fast          only the fast ones
    python docs/examples.py --list          the names, each with its cost class and where it is shown

Each example is "fast" (a few seconds on 2 cores) or "slow" (several estimates of large models: tens of
seconds to minutes). tests/test_docs.py checks the fast ones in the test suite, on the PyTorch version
``./dev`` installs (other versions may print other bytes); run ``python docs/examples.py --check`` by hand
for the slow ones after a change to the engine or to how results are shown.

The examples run in a fixed environment: the variables that change a prediction (allocator settings,
cuBLAS and cuBLASLt workspaces) are unset while they run; what varies between runs (pytest's duration,
temporary and absolute paths) is replaced by a fixed placeholder, and trailing spaces are dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
FAST, SLOW = "fast", "slow"

# The environment variables that change a prediction: unset while the examples run, so the docs show
# what a plain environment gets.
PREDICTION_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG",
                        "CUBLASLT_WORKSPACE_SIZE", "TORCH_CUBLASLT_UNIFIED_WORKSPACE", "DISABLE_ADDMM_CUDA_LT")

BLOCK = re.compile(r"<!-- example: (?P<name>[\w.-]+) -->\n(?P<fence>```[^\n]*\n)(?P<body>.*?)```\n<!-- /example -->",
                   re.DOTALL)


@dataclass(frozen=True)
class Example:
    name: str
    cost: str  # FAST or SLOW
    make: Callable[[], str]


EXAMPLES: dict[str, Example] = {}


def example(name: str, cost: str):
    """Registers the function that prints example ``name``."""
    assert cost in (FAST, SLOW), cost

    def register(make: Callable[[], str]) -> Callable[[], str]:
        if name in EXAMPLES:
            raise ValueError(f"example {name!r} is defined twice")
        EXAMPLES[name] = Example(name, cost, make)
        return make

    return register


# ---- what the examples share ------------------------------------------------------------------------

@contextlib.contextmanager
def fixed_environment() -> Iterator[None]:
    """The repository as working directory, the prediction variables unset, Python's default warning
    filters (pytest installs its own), restored afterwards."""
    saved = {k: os.environ.pop(k) for k in PREDICTION_VARIABLES if k in os.environ}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        os.chdir(cwd)
        os.environ.update(saved)


def text_of(name: str) -> str:
    """What example ``name`` prints now, ending in one newline."""
    with fixed_environment():
        text = EXAMPLES[name].make()
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"


def meta(build: Callable):
    """``build()`` on the meta device: nothing of the model's size is allocated."""
    import torch

    with torch.device("meta"):
        return build()


def resnet50():
    import torchvision

    return meta(torchvision.models.resnet50)


def gpt2():
    """GPT-2 124M (transformers' default GPT2Config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return meta(lambda: GPT2LMHeadModel(GPT2Config()))


def tokens(batch: int, length: int) -> dict:
    import torch

    ids = torch.empty(batch, length, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids}


def excerpt(text: str, first: str | None = None, last: str | None = None) -> str:
    """The lines from the first one starting with ``first`` to the first one after it starting with
    ``last``, with "…" where lines were left out."""
    lines = text.rstrip("\n").splitlines()
    start = 0 if first is None else next(i for i, line in enumerate(lines) if line.startswith(first))
    end = len(lines) if last is None else next(i for i, line in enumerate(lines) if i >= start
                                               and line.startswith(last)) + 1
    return "\n".join((["…"] if start > 0 else []) + lines[start:end] + (["…"] if end < len(lines) else []))


def cli(command: str, first: str | None = None, last: str | None = None) -> str:
    """``$ memtrace ...`` as a console shows it: the command, what it prints on stdout (``excerpt``'s
    lines between ``first`` and ``last``), then on stderr, then its exit status when it is not 0. The
    command is run as written (backslash-newlines joined), through ``memtrace.cli.main`` in this process."""
    from memtrace.cli import main

    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "memtrace", command
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv[1:])
        except SystemExit as exc:  # a usage error
            status = exc.code
    shown = [f"$ {command}", excerpt(out.getvalue(), first, last)]
    if err.getvalue():
        shown.append(err.getvalue().rstrip("\n"))
    if status:
        shown.append(f"$ echo $?\n{status}")
    return "\n".join(shown)


# ---- README.md --------------------------------------------------------------------------------------

@example("tour-python", FAST)
def tour_python() -> str:
    import memtrace

    r = memtrace.report(resnet50(), input_shape=(64, 3, 224, 224), optimizer="adam", amp="bf16", gpu="RTX 4090")
    return r.table(depth=1)


@example("tour-compiled", SLOW)
def tour_compiled() -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import memtrace

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=4000))
    ids = torch.zeros(4, 128, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids}
    with contextlib.redirect_stderr(io.StringIO()):
        eager = memtrace.report(gpt2, inputs=batch, optimizer="adamw", device="cpu")
        compiled = memtrace.report(torch.compile(gpt2), inputs=batch, optimizer="adamw", device="cpu")
    change = 100 * (compiled.peak_bytes - eager.peak_bytes) / eager.peak_bytes
    return (f"eager    {memtrace.format_bytes(eager.peak_bytes, 2)}\n"
            f"compiled {memtrace.format_bytes(compiled.peak_bytes, 2)} ({change:+.1f}%)\n")


@example("tour-cli", SLOW)
def tour_cli() -> str:
    return cli("memtrace torchvision.models:resnet50 --input-shape 3,224,224 --batch-size 256 --amp bf16 "
               "--budget 10GiB", first="Predicted peak", last="activation checkpointing")


LLAMA3_8B = ('{"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, '
             '"num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}')


@example("tour-qlora-8b", SLOW)
def tour_qlora_8b() -> str:
    return cli(f"""memtrace hf:LlamaConfig --model-kwargs '{LLAMA3_8B}' \\
    --dtype bf16 --quantize nf4 --lora-r 16 --seq-len 2048 --batch-size 4 --amp bf16 --checkpoint \\
    --optimizer paged_adamw8bit --gpu "RTX 4090" --no-levers""", first="At the peak", last="Fits RTX 4090")


@example("tour-trainer", FAST)
def tour_trainer() -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import memtrace.hf

    with torch.device("meta"):  # a small LLaMA; a real one comes from from_pretrained(quantization_config=...)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                                             num_attention_heads=8, num_key_value_heads=4, vocab_size=32000))
    model = memtrace.hf.qlora(model.to(torch.bfloat16), r=16)
    args = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "bf16": True,
            "gradient_checkpointing": True, "optim": "paged_adamw_8bit"}
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = memtrace.hf.report(model, args, seq_len=512, gpu="RTX 4090")
    from memtrace.render import summary

    return summary(report) + "\n"


LLAMA3_70B = ('{"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, '
              '"num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}')


@example("tour-fsdp-70b", SLOW)
def tour_fsdp_70b() -> str:
    step = (f"memtrace hf:LlamaConfig --model-kwargs '{LLAMA3_70B}' \\\n"
            """    --seq-len 4096 --batch-size 1 --optimizer adamw --optimizer-kwargs '{"fused": true}' --checkpoint \\\n"""
            "    --mp-param-dtype bf16 --mp-reduce-dtype fp32 --gpu H100 --no-levers")
    eight = cli(step + " --fsdp 8", first="Predicted peak", last="Does not fit")
    four_nodes = cli(step + " --fsdp 32", first="At the peak", last="  - Rank")
    return eight + "\n" + four_nodes


# ---- docs/answers.md --------------------------------------------------------------------------------

@example("max-batch-resnet50", SLOW)
def max_batch_resnet50() -> str:
    import memtrace

    return memtrace.max_batch_size(resnet50(), (3, 224, 224), gpu="A5000").table()


@example("fits-resnet50", SLOW)
def fits_resnet50() -> str:
    import memtrace

    return memtrace.fits(resnet50(), input_shape=(64, 3, 224, 224)).table()


@example("compare-gpt2", SLOW)
def compare_gpt2() -> str:
    import memtrace

    return memtrace.compare(gpt2(), inputs=tokens(8, 1024), optimizer="adamw").table()


@example("levers-gpt2", SLOW)
def levers_gpt2() -> str:
    import memtrace

    return memtrace.levers(gpt2(), inputs=tokens(16, 1024), optimizer="adamw", gpu="RTX 4090").table()


@example("plan-epoch-resnet50", FAST)
def plan_epoch_resnet50() -> str:
    import memtrace

    return memtrace.plan_epoch(resnet50(), (256, 3, 224, 224), dataset_size=1_281_167, gpu="A100-80GB",
                               amp="bf16").table()


# ---- docs/cli.md ------------------------------------------------------------------------------------

@example("cli-resnet50", FAST)
def cli_resnet50() -> str:
    return cli('memtrace torchvision.models:resnet50 --input-shape 3,224,224 --batch-size 64 --amp fp16 --depth 1 '
               '--gpu "RTX 4090"')


@example("cli-llama-budget", SLOW)
def cli_llama_budget() -> str:
    return cli("""memtrace hf:LlamaConfig --seq-len 2048 --batch-size 4 --amp bf16 --optimizer adamw --depth 1 --budget 40GiB \\
    --model-kwargs '{"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": true}'""")


@example("cli-questions", SLOW)
def cli_questions() -> str:
    return cli("""memtrace torchvision.models:resnet50 --input-shape 3,224,224 --batch-size 64 --gpu A5000 \\
    --max-batch --compare fp32,amp,bf16,sgd,checkpoint --dataset-size 1281167""", first="Largest batch that fits")


# ---- docs/pytest.md ---------------------------------------------------------------------------------

PYTEST_EXAMPLE = '''\
# test_memory.py
import pytest
import torch
import torchvision


def test_resnet50_fits_an_a5000(memtrace_budget):
    r = memtrace_budget(torchvision.models.resnet50(), input_shape=(64, 3, 224, 224), optimizer="adam",
                        amp=True, gpu="A5000")            # the budget: an A5000's usable memory
    assert r.layer("layer4").activation_bytes < 2 * 2**30  # the report is returned: assert more


def test_resnet50_batch_256_in_10_gib(memtrace_budget):
    memtrace_budget(torchvision.models.resnet50(), input_shape=(256, 3, 224, 224), optimizer="adam",
                    amp=True, limit="10 GiB")


@pytest.mark.vram_limit("2 GiB")                           # traces the body itself, on fake tensors
def test_train_step():
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        loss = model(torch.randn(512, 4096, device="cuda")).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
'''


@example("pytest-code", FAST)
def pytest_code() -> str:
    return PYTEST_EXAMPLE


@example("pytest-run", SLOW)
def pytest_run() -> str:
    """``pytest -q test_memory.py`` in a fresh directory, 80 columns wide; the duration is replaced by "…"."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_memory.py").write_text(PYTEST_EXAMPLE)
        env = {k: v for k, v in os.environ.items() if k not in PREDICTION_VARIABLES and not k.startswith("PYTEST_")}
        env.update(COLUMNS="80", PY_COLORS="0")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "test_memory.py"], cwd=tmp,
                              env=env, capture_output=True, text=True, timeout=600)
        out = done.stdout.replace(os.path.realpath(tmp), ".").replace(tmp, ".")
    return re.sub(r" in \d+\.\d+s( \(\d+:\d\d:\d\d\))?", " in …s", out)


# ---- reading and writing the Markdown ---------------------------------------------------------------

def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@cache
def shown() -> dict[str, list[tuple[Path, str]]]:
    """Each example name shown in the Markdown, with the page and the text shown there."""
    found: dict[str, list[tuple[Path, str]]] = {}
    for page in pages():
        for m in BLOCK.finditer(page.read_text()):
            found.setdefault(m["name"], []).append((page, m["body"]))
    return found


def unknown_markers() -> list[str]:
    """Marker names in the Markdown without a function here, and opening markers without a closing one."""
    problems = [f"{page.relative_to(ROOT)}: <!-- example: {name} --> has no function in docs/examples.py"
                for name, places in shown().items() if name not in EXAMPLES for page, _ in places]
    for page in pages():
        text = page.read_text()
        opened = len(re.findall(r"<!-- example: ", text))
        if opened != len(BLOCK.findall(text)):
            problems.append(f"{page.relative_to(ROOT)}: {opened} example markers, of which "
                            f"{len(BLOCK.findall(text))} wrap one fenced block and end with <!-- /example -->")
    return problems


def diff(name: str, text: str) -> str:
    """A unified diff of each place example ``name`` is shown against ``text``; empty when they agree."""
    out = []
    for page, body in shown().get(name, []):
        if body != text:
            where = f"{page.relative_to(ROOT)} [{name}]"
            out.append("".join(difflib.unified_diff(body.splitlines(keepends=True), text.splitlines(keepends=True),
                                                    f"{where} (shown)", f"{where} (printed now)")))
    return "".join(out)


def rewrite(texts: dict[str, str]) -> list[Path]:
    """Puts each example's text into its blocks; returns the pages that changed."""
    changed = []
    for page in pages():
        old = page.read_text()
        new = BLOCK.sub(lambda m: (f"<!-- example: {m['name']} -->\n{m['fence']}"
                                   f"{texts.get(m['name'], m['body'])}```\n<!-- /example -->"), old)
        if new != old:
            page.write_text(new)
            changed.append(page)
    shown.cache_clear()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/examples.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 with a diff where a block differs")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="only these examples")
    parser.add_argument("--fast", action="store_true", help="only the fast examples")
    parser.add_argument("--list", action="store_true", help="print the names with their cost class")
    args = parser.parse_args(argv)

    if args.list:
        for ex in EXAMPLES.values():
            where = ", ".join(str(p.relative_to(ROOT)) for p, _ in shown().get(ex.name, [])) or "(not shown)"
            print(f"{ex.name:22} {ex.cost:5} {where}")
        return 0
    names = [n.strip() for given in args.only for n in given.split(",") if n.strip()] or list(EXAMPLES)
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown:
        parser.error(f"unknown example {', '.join(unknown)}; --list shows them")
    if args.fast:
        names = [n for n in names if EXAMPLES[n].cost == FAST]
    problems = unknown_markers() + [f"example {n} is shown nowhere" for n in names if n not in shown()]
    for problem in problems:
        print(problem, file=sys.stderr)

    texts, failed, differs = {}, [], False
    for name in names:
        began = time.perf_counter()
        try:
            texts[name] = text_of(name)
        except Exception as exc:  # noqa: BLE001 - one broken example should not hide the others
            failed.append(name)
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        took = time.perf_counter() - began
        found = diff(name, texts[name])
        differs |= bool(found)
        if args.check and found:
            print(found, end="")
        print(f"{name}: {'differs' if found else 'same'} ({took:.1f} s)", file=sys.stderr)
    if not args.check:
        for page in rewrite(texts):
            print(f"rewrote {page.relative_to(ROOT)}", file=sys.stderr)
    return 1 if failed or problems or (args.check and differs) else 0


if __name__ == "__main__":
    sys.exit(main())
