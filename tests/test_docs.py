"""The outputs shown in README.md and docs/*.md are what the code prints now (docs/examples.py).

Only the fast examples run here, and only on the PyTorch that ``./dev test`` installs on x86_64 with
transformers 5: other versions can print other bytes. ``python docs/examples.py --check`` checks the slow
ones by hand; ``python docs/examples.py --only NAME`` rewrites a block after an intended change.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_examples():
    spec = importlib.util.spec_from_file_location("memtrace_docs_examples", ROOT / "docs" / "examples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


examples = load_examples()
FAST = [name for name, ex in examples.EXAMPLES.items() if ex.cost == examples.FAST]


def pinned_torch() -> str:
    """The torch version ``./dev`` installs on x86_64 (its ``*)`` case)."""
    found = re.search(r'^\s*\*\)\s*TORCH=\("torch==([^"]+)"', (ROOT / "dev").read_text(), re.MULTILINE)
    assert found, "dev no longer pins torch for x86_64 in a '*) TORCH=(\"torch==...\"' line"
    return found[1]


def version_mismatch() -> str | None:
    import transformers

    torch_release = torch.__version__.split("+")[0]
    if torch_release != pinned_torch():
        return f"the docs show torch {pinned_torch()}'s output (./dev's pin); this is torch {torch_release}"
    if not transformers.__version__.startswith("5."):
        return f"the docs show transformers 5's output; this is transformers {transformers.__version__}"
    return None


def test_every_marker_names_an_example_and_every_example_is_shown():
    assert examples.unknown_markers() == []
    assert sorted(set(examples.EXAMPLES) - set(examples.shown())) == []


@pytest.mark.parametrize("name", FAST)
def test_fast_example_is_what_the_code_prints(name):
    reason = version_mismatch()
    if reason:
        pytest.skip(reason)
    difference = examples.diff(name, examples.text_of(name))
    assert not difference, (f"the docs show what the code no longer prints; after an intended change run "
                            f"`python docs/examples.py --only {name}` and review the diff:\n{difference}")
