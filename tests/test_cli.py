"""The ``memtrace`` command, run as a real console script in a subprocess where the exit status and the
streams matter, and in process (``memtrace.cli.main``) for the many argument checks.

Whole outputs are compared with tests/golden/cli_*; after an intended change to the output, regenerate
them with ``python -m pytest tests/test_cli.py --update-golden`` and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import memtrace
from memtrace.cli import main
from memtrace.loading import build_model, default_task

from tiny_models import make_mlp

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
MLP = "tests/tiny_models.py:make_mlp"


def command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m memtrace``."""
    script = Path(sys.executable).with_name("memtrace")
    if script.exists():
        return [str(script)]
    found = shutil.which("memtrace")
    return [found] if found else [sys.executable, "-m", "memtrace"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    return subprocess.run(command() + list(args), cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def check_golden(name: str, text: str, update: bool) -> None:
    path = GOLDEN / name
    if update:
        path.write_text(text)
    assert text == path.read_text()


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name == "memtrace"}
    assert scripts == {"memtrace": "memtrace.cli:main"}


def test_cpu_table_matches_golden(update_golden):
    out = run(MLP, "--input-shape", "4", "--batch-size", "3", "--optimizer", "sgd", "--device", "cpu", "--depth", "1")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    check_golden("cli_mlp_cpu.txt", out.stdout, update_golden)


def test_cuda_table_says_whether_it_fits(update_golden):
    out = run(MLP, "--input-shape", "3,4", "--gpu", "T4")
    assert out.returncode == 0, out.stderr
    check_golden("cli_mlp_t4.txt", out.stdout, update_golden)
    usable = memtrace.GPUS["t4"].usable_bytes()
    assert f"Fits T4 ({memtrace.format_bytes(usable)} usable of 14.6 GiB" in out.stdout  # 14,912 MiB


def test_markdown_matches_golden(update_golden):
    out = run(MLP, "--input-shape", "3,4", "--device", "cpu", "--format", "markdown")
    assert out.returncode == 0, out.stderr
    check_golden("cli_mlp_cpu.md", out.stdout, update_golden)
    assert out.stdout.startswith("## memtrace: Sequential")
    assert "| Layer " in out.stdout and "|---" in out.stdout


def test_json_equals_the_report_dict():
    out = run("examples/models.py:tiny_gpt", "--model-kwargs", '{"vocab": 100, "dim": 32, "layers": 2, "heads": 2}',
              "--seq-len", "16", "--batch-size", "2", "--amp", "bf16", "--optimizer", "adamw", "--format", "json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from models import tiny_gpt
    finally:
        sys.path.remove(str(ROOT / "examples"))
    ids = torch.empty(2, 16, dtype=torch.long, device="meta")
    with torch.device("meta"):
        model = tiny_gpt(vocab=100, dim=32, layers=2, heads=2)
    expected = memtrace.report(model, inputs={"input_ids": ids, "labels": ids}, amp="bf16", optimizer="adamw")
    assert got == json.loads(json.dumps(expected.to_dict(allocations=False)))
    assert got["schema_version"] == 1 and "allocations" not in got


def test_budget_over_exits_3_with_one_line():
    out = run(MLP, "--input-shape", "3,4", "--device", "cpu", "--budget", "100B")
    assert out.returncode == 3
    peak = memtrace.report(make_mlp(), (3, 4), device="cpu").peak_bytes
    assert out.stderr == (f"memtrace: predicted peak {memtrace.format_bytes(peak)} is over the budget of 100 B "
                          f"by {memtrace.format_bytes(peak - 100)}\n")
    assert f"Over the budget of 100 B by {memtrace.format_bytes(peak - 100)}" in out.stdout


def test_budget_within_exits_0():
    out = run(MLP, "--input-shape", "3,4", "--device", "cpu", "--budget", "1 MiB")
    assert out.returncode == 0 and out.stderr == ""
    assert "Within the budget of 1.0 MiB" in out.stdout


def test_usage_and_build_errors_have_their_exit_status():
    usage = run(MLP, "--input-shape", "3,4", "--budget", "lots")
    assert usage.returncode == 2
    assert usage.stderr.count("\n") == 1 and usage.stderr.startswith("memtrace: error: argument --budget: cannot read")
    broken = run("no_such_package.models:net", "--input-shape", "3")
    assert broken.returncode == 1
    assert broken.stderr == "memtrace: error: cannot import no_such_package.models: ModuleNotFoundError: " \
                            "No module named 'no_such_package'\n"


def test_module_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "memtrace", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    assert "'16GB' is 16 * 10**9 bytes" in out.stdout and "hf:LlamaConfig" in out.stdout


@pytest.mark.parametrize("args, status, message", [
    ([MLP], 2, "no input: give --input-shape"),
    ([MLP, "--input-shape", "3,4", "--seq-len", "8"], 2, "give the input one way: --input-shape and --seq-len"),
    ([MLP, "--input-shape", "3,a"], 2, "argument --input-shape: cannot read shape '3,a'"),
    ([MLP, "--input-shape", "3,4", "--gpu", "K80"], 2, "argument --gpu: 'K80' is unknown; valid: 'H100'"),
    ([MLP, "--input-shape", "3,4", "--device", "cpu", "--gpu", "T4"], 2, "--gpu names the card of a --device cuda run"),
    ([MLP, "--input-shape", "3,4", "--optimizer", "lamb"], 2, "argument --optimizer: invalid choice: 'lamb'"),
    ([MLP, "--input-shape", "3,4", "--optimizer-kwargs", "{lr: 1}"], 2, "argument --optimizer-kwargs: not valid JSON"),
    ([MLP, "--input-shape", "3,4", "--optimizer-kwargs", "[1]"], 2, "expected a JSON object"),
    ([MLP, "--input-shape", "3,4", "--amp", "fp16", "--dtype", "bf16"], 2, "amp='fp16' needs float32 parameters"),
    ([MLP, "--input", "3,4", "--batch-size", "3"], 2, "--batch-size goes with --input-shape or --seq-len"),
    ([MLP, "--input", "x=3,4", "--input", "3,4"], 2, "positional --input after a named one"),
    ([MLP, "--input", "3-4=3,4"], 2, "input name '3-4' in '3-4=3,4' is not an identifier"),
    (["torchvision.models", "--input-shape", "3"], 2, "cannot read MODEL 'torchvision.models': write package.module:factory"),
    ([MLP, "--input-shape", "3,4", "--task", "causal-lm"], 2, "--task is for Hugging Face models"),
    ([MLP, "--input-shape", "4", "--max-batch"], 2, "--max-batch and --fits vary the batch size: give --batch-size"),
    ([MLP, "--input-shape", "4", "--batch-size", "3", "--fits", "--device", "cpu"], 2, "--fits predicts a CUDA run"),
    ([MLP, "--input-shape", "4", "--batch-size", "3", "--max-batch", "--device", "cpu"], 2, "needs --budget"),
    ([MLP, "--input-shape", "3,4", "--samples-per-second", "9"], 2, "--samples-per-second goes with --dataset-size"),
    ([MLP, "--input-shape", "3,4", "--compare", "fp32,fp8"], 2, "argument --compare: variant 'fp8' is unknown"),
    ([MLP, "--input-shape", "3,4", "--checkpoint"], 2, "checkpoint='auto': Sequential has no repeated blocks"),
    ([MLP, "--input-shape", "3,4", "--checkpoint", "9"], 2, "checkpoint="),
    (["tests/tiny_models.py:nope", "--input-shape", "3"], 1, "has no attribute 'nope'"),
    (["tests/missing.py:net", "--input-shape", "3"], 1, "no such file: tests/missing.py"),
    (["torch.nn:Linear", "--input-shape", "3"], 1, "building torch.nn:Linear failed: TypeError"),
    (["torch:float32", "--input-shape", "3"], 1, "torch:float32 is a dtype, not a callable"),
    (["tests/tiny_models.py:token_batch", "--input-shape", "3"], 1, "returned a dict, not a torch.nn.Module"),
    (["hf:Llama", "--seq-len", "8"], 1, "hf:Llama is not a transformers configuration class"),
    (["hf:GPT2Config", "--model-kwargs", '{"n_layers": 2}', "--seq-len", "8"], 2,
     "--model-kwargs field 'n_layers' is not a field of GPT2Config (hf:GPT2Config); closest: n_layer, "),
    (["hf:LlamaConfig", "--model-kwargs", '{"hidden": 64}', "--seq-len", "8"], 2,
     "--model-kwargs field 'hidden' is not a field of LlamaConfig"),
    ([MLP, "--input-shape", "3,5"], 1, "forward of iteration 0 failed in module '0' (Linear, input shapes [3, 5])"),
])
def test_bad_input_exit_status_and_message(args, status, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == status
    assert message in err
    assert err.startswith("memtrace: error: ") and err.count("\n") == 1


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception, match="mat1 and mat2|size mismatch|shapes"):
        main([MLP, "--input-shape", "3,5", "--debug"])


def test_verify_without_a_gpu_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main([MLP, "--input-shape", "3,4", "--verify"])
    assert exit_info.value.code == 2
    assert "--verify runs the real step on a CUDA GPU, and none is present here" in capsys.readouterr().err


def run_in_process(args, capsys, monkeypatch) -> str:
    monkeypatch.chdir(ROOT)
    assert main(args + ["--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_named_inputs_and_input_dtype(capsys, monkeypatch):
    got = run_in_process(["examples/models.py:tiny_gpt", "--model-kwargs", '{"vocab": 50, "dim": 16, "layers": 1, '
                          '"heads": 2}', "--input", "input_ids=2,8:long", "--input", "labels=2,8:long"],
                         capsys, monkeypatch)
    assert got["settings"]["inputs"] == [{"key": "input_ids", "shape": [2, 8], "dtype": "int64"},
                                         {"key": "labels", "shape": [2, 8], "dtype": "int64"}]
    got = run_in_process([MLP, "--input-shape", "3,4", "--input-dtype", "float16", "--device", "cpu",
                          "--inference"], capsys, monkeypatch)
    assert got["settings"]["inputs"] == [{"key": 0, "shape": [3, 4], "dtype": "float16"}]
    assert got["settings"]["train"] is False and got["by_category"]["gradients"] == 0


def test_batch_size_is_prepended_and_seq_len_defaults_to_batch_1(capsys, monkeypatch):
    got = run_in_process([MLP, "--input-shape", "4", "--batch-size", "5", "--device", "cpu"], capsys, monkeypatch)
    assert got["settings"]["inputs"][0]["shape"] == [5, 4]
    got = run_in_process(["examples/models.py:tiny_gpt", "--model-kwargs", '{"vocab": 50, "dim": 16, "layers": 1, '
                          '"heads": 2}', "--seq-len", "8"], capsys, monkeypatch)
    assert [i["shape"] for i in got["settings"]["inputs"]] == [[1, 8], [1, 8]]  # input_ids and labels


def test_allocations_only_on_request(capsys, monkeypatch):
    got = run_in_process([MLP, "--input-shape", "3,4", "--device", "cpu", "--allocations"], capsys, monkeypatch)
    assert got["allocations"] == memtrace.report(make_mlp(), (3, 4), device="cpu").to_dict()["allocations"]


TINY_LLAMA = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 100}


def test_hugging_face_config_class_with_overrides(capsys, monkeypatch):
    got = run_in_process(["hf:LlamaConfig", "--model-kwargs", json.dumps(TINY_LLAMA), "--seq-len", "16",
                          "--batch-size", "2", "--amp", "bf16"], capsys, monkeypatch)
    assert got["model"] == "LlamaForCausalLM"
    # embed 100*64 + head 100*64 + norms 2*64 + 1 layer: q 64*64, k/v 64*32 each, o 64*64, mlp 3*64*128, 2 norms
    assert got["param_count"] == 2 * 100 * 64 + 64 + (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64)
    assert [i["key"] for i in got["settings"]["inputs"]] == ["input_ids", "labels"]


def test_local_config_json_and_task(tmp_path, capsys, monkeypatch):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
               vocab_size=100).save_pretrained(tmp_path)
    got = run_in_process([str(tmp_path), "--seq-len", "8", "--batch-size", "3"], capsys, monkeypatch)
    assert got["model"] == "BertForMaskedLM"  # an encoder: its masked-LM head, not the causal one
    got = run_in_process([str(tmp_path / "config.json"), "--task", "classification", "--seq-len", "8",
                          "--batch-size", "3"], capsys, monkeypatch)
    assert got["model"] == "BertForSequenceClassification"
    assert got["settings"]["inputs"][1] == {"key": "labels", "shape": [3], "dtype": "int64"}


def test_default_task_follows_architectures():
    from transformers import BertConfig, GPT2Config, T5Config, ViTConfig

    assert default_task(GPT2Config()) == "causal-lm"
    assert default_task(BertConfig()) == "masked-lm"
    assert default_task(BertConfig(architectures=["BertForSequenceClassification"])) == "classification"
    assert default_task(T5Config()) == "seq2seq"
    assert default_task(ViTConfig()) == "image-classification"


def test_models_are_built_on_meta_where_the_factory_allows(tmp_path):
    factory = tmp_path / "factories.py"
    factory.write_text("import torch\n"
                       "def plain():\n"
                       "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))\n"
                       "def needs_values():\n"
                       "    widths = [int(w) for w in torch.tensor([4.0, 2.0]).tolist()]  # real values needed\n"
                       "    return torch.nn.Linear(*widths)\n")
    built = build_model(f"{factory}:plain")
    assert built.on_meta and all(p.is_meta for p in built.module.parameters())
    built = build_model(f"{factory}:needs_values")
    assert not built.on_meta and built.module.weight.shape == (2, 4)
    assert "cannot be built on the meta device" in built.note


GPT = ["examples/models.py:tiny_gpt", "--model-kwargs", '{"vocab": 64, "dim": 16, "layers": 3, "heads": 2}']


def test_questions_answered_as_the_python_api_answers_them(capsys, monkeypatch):
    got = run_in_process(GPT + ["--seq-len", "8", "--batch-size", "2", "--optimizer", "sgd", "--max-batch",
                                "--budget", "70 MiB", "--compare", "fp32,bf16+checkpoint", "--dataset-size", "1000"],
                         capsys, monkeypatch)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from models import tiny_gpt
    finally:
        sys.path.remove(str(ROOT / "examples"))
    with torch.device("meta"):
        model = tiny_gpt(vocab=64, dim=16, layers=3, heads=2)
    ids = torch.empty(2, 8, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "labels": ids}
    largest = memtrace.max_batch_size(model, inputs=inputs, limit="70 MiB", optimizer="sgd")
    assert got["max_batch"]["batch_size"] == largest.batch_size > 2
    comparison = memtrace.compare(model, inputs=inputs, variants=["fp32", "bf16+checkpoint"], optimizer="sgd")
    assert [row["peak_bytes"] for row in got["compare"]["rows"]] == [row.peak_bytes for row in comparison.rows]
    assert got["epoch"]["iterations"] == 500  # ceil(1000 / 2)
    assert "levers" not in got  # it fits


def test_levers_when_it_does_not_fit(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = GPT + ["--seq-len", "8", "--batch-size", "64", "--budget", "65 MiB"]
    assert main(args) == 3
    out, err = capsys.readouterr()
    assert "Does not fit: predicted peak" in out and "Levers, each estimated" in out
    assert main(args + ["--no-levers"]) == 3
    out, err = capsys.readouterr()
    assert "Levers" not in out


def test_checkpoint_plot_and_snapshot(tmp_path, capsys, monkeypatch):
    import pickle

    got = run_in_process(GPT + ["--seq-len", "8", "--checkpoint", "--plot", str(tmp_path / "step.png"),
                                "--snapshot", str(tmp_path / "step.pickle")], capsys, monkeypatch)
    assert got["settings"]["checkpoint"] == ["layers.0", "layers.1", "layers.2"]
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "device_traces" in pickle.loads((tmp_path / "step.pickle").read_bytes())


def test_a_factory_file_imports_its_neighbours(tmp_path):
    (tmp_path / "neighbour_blocks.py").write_text("import torch\ndef block():\n    return torch.nn.Linear(6, 2)\n")
    (tmp_path / "net.py").write_text("def net():\n"
                                     "    import neighbour_blocks  # imported when called, not at import\n"
                                     "    return neighbour_blocks.block()\n")
    built = build_model(f"{tmp_path / 'net.py'}:net")
    assert built.module.in_features == 6
    assert str(tmp_path) not in sys.path


def test_gradient_accumulation_flag(capsys, monkeypatch):
    data = run_in_process([MLP, "--input-shape", "3,4", "--accumulation-steps", "2"], capsys, monkeypatch)
    expected = memtrace.report(make_mlp(), (3, 4), accumulation_steps=2)
    assert data["settings"]["accumulation_steps"] == 2 and data["peak_bytes"] == expected.peak_bytes
    assert "2 step(s) of 2 accumulated micro-batches" in expected.table()


def test_alloc_conf_flag(capsys, monkeypatch):
    data = run_in_process([MLP, "--input-shape", "3,4", "--alloc-conf", "expandable_segments:True"], capsys,
                          monkeypatch)
    assert data["allocator"] == "cuda-caching, expandable segments"
    assert data["settings"]["alloc_conf"] == "expandable_segments:True"


def test_detection_images_and_targets(capsys, monkeypatch):
    pytest.importorskip("torchvision")
    detector = ["torchvision.models.detection:fasterrcnn_mobilenet_v3_large_320_fpn", "--model-kwargs",
                '{"weights_backbone": null, "num_classes": 5}', "--device", "cpu", "--optimizer", "sgd", "--steps", "1"]
    got = run_in_process(detector + ["--images", "2,3,96,128", "--boxes", "3", "--data-dependent",
                                     '{"rpn:nms": 100}'], capsys, monkeypatch)
    keys = [(i["key"], i["shape"]) for i in got["settings"]["inputs"]]
    assert keys[:2] == [("0[0]", [3, 96, 128]), ("0[1]", [3, 96, 128])]
    assert ("1[1].boxes", [3, 4]) in keys and ("1[1].labels", [3]) in keys
    assert any(a.startswith("nms in module 'rpn': output size 100 of at most") and a.endswith("(given)")
               for a in got["assumptions"])
    assert any(a.startswith("nonzero in module 'rpn'") and a.endswith("(upper bound)") for a in got["assumptions"])


@pytest.mark.parametrize("args, message", [
    (["--images", "2,3,96"], "--images takes N,C,H,W"),
    (["--input-shape", "3,4", "--data-dependent", "2"], "must be in (0, 1]"),
    (["--input-shape", "3,4", "--data-dependent", "lots"], "'lots' is unknown"),
])
def test_bad_detection_and_data_dependent_flags(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main([MLP, *args]))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
