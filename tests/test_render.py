"""The report renders: text (summary, categories, per-layer table) and JSON.

The whole text of one small report is compared with tests/golden/mlp_cpu_sgd.txt; after an intended change
to the output, regenerate it with ``python -m pytest tests/test_render.py --update-golden`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import memtrace
from memtrace import Category, Phase, format_bytes

from tiny_models import make_mlp

GOLDEN = Path(__file__).parent / "golden"


def mlp_report(**kwargs) -> memtrace.Report:
    return memtrace.report(make_mlp(), (3, 4), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, device="cpu", **kwargs)


def test_text_matches_golden(update_golden):
    text = str(mlp_report())
    path = GOLDEN / "mlp_cpu_sgd.txt"
    if update_golden:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text + "\n")
    assert text + "\n" == path.read_text()


def test_text_has_summary_categories_and_layers():
    r = mlp_report()
    text = str(r)
    assert text == r.table()
    assert "memtrace: Sequential — 58 parameters (58 trainable)" in text
    assert "Predicted peak: 672 B" in text  # 672 = the hand count in test_exact_bytes.py
    assert "iteration 0, backward" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("Layer"))
    for column in ("Type", "Output shape", "Params", "Param mem", "Grad mem", "Optim state", "Activations"):
        assert column in header
    # one row per module, indented by depth, in named_modules() order
    rows = [line for line in lines[lines.index(header) + 2:] if line.strip()]
    assert [row.split()[:2] for row in rows] == [["Sequential", "Sequential"], ["├─0", "Linear"], ["├─1", "ReLU"],
                                                  ["├─2", "Linear"]]
    for c in Category:
        if c not in (Category.WORKSPACE, Category.COMMUNICATION):  # shown when not zero
            assert c.value.replace("_", " ") in text


def test_layer_names_are_indented_by_depth():
    r = mlp_report()
    lines = r.table().splitlines()
    row_of = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ("Sequential", "├─0")}
    assert row_of["Sequential"].startswith("Sequential")
    assert row_of["├─0"].startswith("├─0 ")


def test_table_depth_limits_rows():
    r = mlp_report()
    assert "Linear" not in r.table(depth=0).split("Layer", 1)[1]
    assert r.table(depth=1).count("Linear") == 2


def test_json_round_trips():
    r = mlp_report()
    d = r.to_dict()
    assert json.loads(r.to_json()) == d
    assert json.loads(r.to_json(indent=2)) == d
    assert d["peak_bytes"] == r.peak_bytes == 672
    assert d["peak"] == {"allocated_bytes": 672, "iteration": 0, "phase": "backward", "module": "1",
                         "op": "aten.threshold_backward.default", "event": r.peak.event}
    assert d["by_category"] == {c.value: n for c, n in r.by_category.items()}
    assert sum(d["by_category"].values()) == d["peak_bytes"]
    for key in ("model", "device", "allocator", "param_count", "trainable_param_count", "reserved_peak_bytes",
                "traced_ops"):
        assert d[key] == getattr(r, key), key
    assert d["layers"][0] == {**dataclasses.asdict(r.layers[0]), "output_shape": [3, 2]}
    assert len(d["allocations"]) == len(r.allocations)
    assert d["timeline"]["allocated_bytes"] == list(r.timeline.allocated_bytes)
    assert "allocations" not in r.to_dict(allocations=False)


def test_cuda_text_mentions_reserved_memory_and_notes():
    r = memtrace.report(make_mlp(), (3, 4), device="cuda")
    text = str(r)
    assert "Reserved by the caching allocator" in text and format_bytes(r.reserved_peak_bytes, 2) in text
    assert "Notes:" in text and all(note in text for note in r.notes)
    # one 2 MiB small-pool segment and the two 32 MiB cuBLAS workspaces of an H100
    assert json.loads(r.to_json())["reserved_peak_bytes"] == r.reserved_peak_bytes == (2 + 2 * 32) * 1024 * 1024


def test_report_is_immutable():
    r = mlp_report()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.peak_bytes = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.by_category[Category.INPUT] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        r.settings["steps"] = 5  # type: ignore[index]
    with pytest.raises(KeyError, match="'nope'"):
        r.layer("nope")


def test_inference_text_says_inference():
    r = mlp_report(train=False)
    assert "inference on cpu" in str(r)
    assert r.peak.phase is Phase.FORWARD


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**20, "3.0 MiB"),
                                     (5 * 2**30, "5.0 GiB")])
def test_format_bytes_is_binary(n, text):
    assert format_bytes(n) == text
