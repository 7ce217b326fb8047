"""bitsandbytes 4-bit weights (QLoRA's base model), its 8-bit and paged optimizers, LoRA adapters on top, and
the Hugging Face Trainer's arguments: exact bytes on small models, and the CPU run under the profiler.

Sizes for a Linear4bit(256, 512) weight, nf4 or fp4 (131,072 values, block size 64):
  packed values: 131072 / 2 = 65,536 B (uint8)
  absmax: 2,048 blocks; float32 (8,192 B), or with double quantisation uint8 (2,048 B) plus a float32 offset
  (4 B), float32 absmax per 256 of them (8 values, 32 B) and its copy of the 256-entry dynamic map (1,024 B)
  code: the 16 values of nf4 or fp4, float32 (64 B)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace
from memtrace import Category, Phase

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.nn import Linear4bit  # noqa: E402

from memtrace.gpus import lookup  # noqa: E402
from memtrace.measure import measure_cpu  # noqa: E402
from memtrace.quantized import cuda_gemm_4bit_kernel, quantize_4bit  # noqa: E402

PACKED, BLOCKS = 65_536, 2_048
NESTED_STATS = BLOCKS + 4 + 32 + 64 + 1024  # uint8 absmax, offset, nested absmax, code, the dynamic map's copy
PLAIN_STATS = BLOCKS * 4 + 64  # float32 absmax, code


class TwoLinears(nn.Module):
    """A 4-bit Linear(256, 512) and Linear(512, 256) with a rank-8 adapter (float32) beside the first."""

    def __init__(self, nested=True, quant_type="nf4", quantize=True):
        super().__init__()
        torch.manual_seed(0)
        kw = dict(bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=nested)
        self.a = Linear4bit(256, 512, **kw)
        self.b = Linear4bit(512, 256, **kw)
        self.lora_a = nn.Linear(256, 8, bias=False)
        self.lora_b = nn.Linear(8, 512, bias=False)
        if quantize:
            self.a.to("cpu")  # bitsandbytes quantises as a weight moves to a device
            self.b.to("cpu")

    def forward(self, x):
        return self.b(torch.relu(self.a(x) + self.lora_b(self.lora_a(x))))


@pytest.mark.parametrize("nested, stats", [(True, NESTED_STATS), (False, PLAIN_STATS)])
def test_packed_weight_and_statistics_are_the_layers_parameters(nested, stats):
    r = memtrace.report(TwoLinears(nested), (4, 256), optimizer="adam", device="cpu")
    rows = {row.name: row for row in r.layers}
    assert (rows["a"].params, rows["a"].param_bytes, rows["a"].gradient_bytes) == (131_072, PACKED + stats, 0)
    assert (rows["b"].params, rows["b"].param_bytes) == (131_072, PACKED + stats)
    assert r.param_count == 2 * 131_072 + 8 * 256 + 512 * 8
    assert r.trainable_param_count == 8 * 256 + 512 * 8
    assert any("bitsandbytes" in n and "4-bit" in n for n in r.notes)


def test_weights_not_quantised_yet_are_quantised_on_fake_tensors():
    # a model built on the meta device and its Linears replaced, as transformers does before loading: the
    # same bytes as the weights quantised for real
    with torch.device("meta"):
        lazy = TwoLinears(quantize=False)
    r_lazy = memtrace.report(lazy, (4, 256), optimizer="adam", device="cpu")
    r_real = memtrace.report(TwoLinears(), (4, 256), optimizer="adam", device="cpu")
    assert r_lazy.peak_bytes == r_real.peak_bytes
    assert r_lazy.by_category == r_real.by_category


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_step_matches_the_profiler_to_the_byte(nested, quant_type):
    model = TwoLinears(nested, quant_type)
    kw = dict(optimizer="adam", device="cpu")
    assert memtrace.report(model, (64, 256), **kw).peak_bytes == measure_cpu(model, (64, 256), **kw).peak_bytes


def test_backward_dequantises_the_weight_in_its_dtype():
    # MatMul4Bit.backward for b's input gradient: dequantize_4bit(B) in the weight's dtype (float32 here:
    # 256 x 512 x 4 B), then .to(grad_output.dtype) for the matmul (bfloat16: half of it); a's input (x) needs
    # no gradient, so a's backward dequantises nothing
    r = memtrace.report(TwoLinears(nested=False), (4, 256), optimizer="adam", device="cpu")
    backward = [(a.module, a.op, a.requested_bytes) for a in r.allocations
                if a.phase is Phase.BACKWARD and a.iteration == 0 and a.module in ("a", "b")]
    assert ("b", "bitsandbytes.dequantize_4bit.default", 256 * 512 * 4) in backward
    assert ("b", "aten._to_copy.default", 256 * 512 * 2) in backward
    assert not [op for module, op, _ in backward if module == "a"]


def test_cuda_fallback_holds_the_dequantised_weight_during_the_matmul():
    # bitsandbytes' gemm_4bit on CUDA past 1536 rows: _dequant_linear_fallback holds the dequantised absmax
    # (float32 per block, and its sum with the offset) and the whole weight [512, 256] in bfloat16 while cuBLAS
    # runs; at 4 rows, its fused kernel allocates the output only
    gpu = lookup("H100")
    assert cuda_gemm_4bit_kernel(gpu, torch.bfloat16, 2048, 512, 256, 64) is False
    assert cuda_gemm_4bit_kernel(gpu, torch.bfloat16, 4, 512, 256, 64) is True
    model = TwoLinears()

    def forward_temporaries(rows):
        r = memtrace.report(model, (rows, 256), optimizer="adam", device="cuda", gpu="H100")
        return sorted(a.requested_bytes for a in r.allocations
                      if a.phase is Phase.FORWARD and a.iteration == 1 and a.module == "a"
                      and a.category is Category.TEMPORARY and a.op.startswith("aten.empty"))

    assert forward_temporaries(2048) == sorted([BLOCKS * 4, 512 * 256 * 2])
    assert forward_temporaries(4) == [4 * 512 * 2]  # the fused kernel's output, nothing else


def test_8bit_adam_state_is_uint8_with_blockwise_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
    r = memtrace.report(model, (32, 256), optimizer="adamw8bit", device="cpu")
    rows = {row.name: row for row in r.layers}
    # weight 131,072 values: two uint8 states (131,072 B each) and float32 absmax per 256 (512 x 4 B each);
    # bias (512 values, under min_8bit_size 4096): two float32 states; the two 256-entry maps, shared, once
    maps = 2 * 256 * 4
    assert rows["0"].optimizer_state_bytes == 2 * 131_072 + 2 * 512 * 4 + 2 * 512 * 4 + maps
    assert rows["2"].optimizer_state_bytes == 2 * 32_768 + 2 * 128 * 4 + 2 * 64 * 4
    real = measure_cpu(model, (32, 256), optimizer="adamw8bit", device="cpu").peak_bytes
    assert abs(r.peak_bytes - real) <= 64  # the CPU kernels' 0-dim host scalars


def test_paged_optimizer_states_are_outside_max_memory_allocated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
    paged = memtrace.report(model, (32, 256), optimizer="paged_adamw8bit", device="cuda")
    plain = memtrace.report(model, (32, 256), optimizer="adamw8bit", device="cuda")
    rows_paged = {row.name: row for row in paged.layers}
    rows_plain = {row.name: row for row in plain.layers}
    # the first weight's states (131,072 values >= 100,000) are in unified memory; the second's are not
    assert rows_plain["0"].optimizer_state_bytes - rows_paged["0"].optimizer_state_bytes == 2 * 131_072
    assert rows_paged["2"].optimizer_state_bytes == rows_plain["2"].optimizer_state_bytes
    assert any("unified memory" in n for n in paged.notes)
    assert not any("unified memory" in n for n in plain.notes)


def test_8bit_base_weights_are_refused():
    model = nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False))
    with pytest.raises(ValueError, match="8-bit weight"):
        memtrace.report(model, (2, 64), device="cpu")


# ------------------------------------------------------------------------------------------------------
# QLoRA on a LLaMA-shaped model: transformers + peft
# ------------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def qlora_llama(meta: bool, rank: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    model = quantize_4bit(model.to(torch.bfloat16))
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))


def token_batch(model, batch=2, seq=64):
    from memtrace.loading import token_inputs

    return token_inputs(model, batch, seq, "causal-lm")


def test_qlora_llama_cpu_step_matches_the_profiler():
    model = qlora_llama(meta=False)
    kw = dict(inputs=token_batch(model), optimizer="adamw", device="cpu")
    predicted, real = memtrace.report(model, **kw).peak_bytes, measure_cpu(model, **kw).peak_bytes
    assert abs(predicted - real) <= 256, (predicted, real)  # the CPU kernels' 0-dim host scalars


def test_lora_adapters_hold_the_gradients_and_optimizer_state():
    r = memtrace.report(qlora_llama(meta=True, rank=8), inputs=token_batch(qlora_llama(meta=True, rank=8)),
                        optimizer="adamw", device="cpu")
    # per layer: q, k, v, o, gate, up, down with rank 8 adapters, float32 (peft keeps adapters float32):
    # A is [8, in], B is [out, 8]; hidden 256, kv 128 (2 heads of 64), intermediate 512
    shapes = [(256, 256), (256, 128), (256, 128), (256, 256), (256, 512), (256, 512), (512, 256)]
    adapter_values = sum(8 * i + o * 8 for i, o in shapes) * 2  # two layers
    assert r.trainable_param_count == adapter_values
    root = next(row for row in r.layers if row.name == "")
    assert root.gradient_bytes == adapter_values * 4
    # AdamW's exp_avg and exp_avg_sq, and on the CPU its 0-dim float32 step per adapter matrix (28)
    assert root.optimizer_state_bytes == 2 * adapter_values * 4 + 28 * 4


# ------------------------------------------------------------------------------------------------------
# memtrace.hf: the Trainer's arguments
# ------------------------------------------------------------------------------------------------------
import memtrace.hf  # noqa: E402


def test_trainer_arguments_become_the_step():
    model = qlora_llama(meta=True)
    args = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "bf16": True,
            "gradient_checkpointing": True, "optim": "paged_adamw_8bit"}
    kw = memtrace.hf.report_arguments(model, memtrace.hf.training_arguments(args), seq_len=64)
    assert (kw["amp"], kw["accumulation_steps"], kw["checkpoint"]) == ("bf16", 2, "auto")
    assert kw["inputs"]["input_ids"].shape == (2, 64)
    opt = kw["optimizer"](list(model.parameters()))
    assert type(opt).__name__ == "AdamW" and opt.is_paged and opt.args.optim_bits == 8
    # the Trainer's two groups: weight decay on all but biases and norms, frozen parameters left out
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    r = memtrace.hf.report(model, args, seq_len=64, device="cpu")
    direct = memtrace.report(model, inputs=token_batch(model), optimizer=kw["optimizer"], amp="bf16",
                             accumulation_steps=2, checkpoint="auto", device="cpu", keep_output=False)
    assert r.peak_bytes == direct.peak_bytes
    # the Trainer's step keeps only the loss through backward: the output's bfloat16 logits [2, 64, 1000] and its
    # loss before the division by the accumulation steps (4 B) are gone; the batch stays (the Trainer's loop
    # holds every micro-batch of the step)
    kept = memtrace.report(model, inputs=token_batch(model), optimizer=kw["optimizer"], amp="bf16",
                           accumulation_steps=2, checkpoint="auto", device="cpu")
    assert kept.peak_bytes - r.peak_bytes == 2 * 64 * 1000 * 2 + 4
    assert r.settings["keep_output"] is False and "keep_output" not in kept.settings
    assert "paged AdamW 8-bit" in r.settings["optimizer"]


def test_trainer_arguments_from_a_file(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("per_device_train_batch_size: 4\noptim: adamw_torch_fused\nbf16: true\n")
    args = memtrace.hf.training_arguments(path)
    assert (args.per_device_train_batch_size, args.bf16, args.gradient_accumulation_steps) == (4, True, 1)
    json_path = tmp_path / "args.json"
    json_path.write_text('{"per_device_train_batch_size": 4, "optim": "adamw_torch_fused"}')
    assert memtrace.hf.training_arguments(json_path).per_device_train_batch_size == 4
    with pytest.raises(ValueError, match="not TrainingArguments fields: per_device_batch"):
        memtrace.hf.training_arguments({"per_device_batch": 4})
    with pytest.raises(ValueError, match="not one of the Trainer's optimizers"):
        memtrace.hf.training_arguments({"optim": "adamw_9bit"})
    with pytest.raises(ValueError, match="fsdp"):
        memtrace.hf.report_arguments(qlora_llama(meta=True), memtrace.hf.training_arguments({"fsdp": "full_shard"}),
                                     seq_len=8)


def test_callback_prints_the_prediction_when_training_begins():
    from types import SimpleNamespace

    model = qlora_llama(meta=True)
    lines = []
    callback = memtrace.hf.MemtraceCallback(seq_len=32, print_fn=lines.append, device="cpu")
    args = memtrace.hf.training_arguments({"per_device_train_batch_size": 1})
    callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None, model=model)
    assert callback.report is not None and len(lines) == 1 and f"{callback.report.peak_bytes:,} B" in lines[0]
    callback.on_step_end(args, SimpleNamespace(is_world_process_zero=True, global_step=2), None)
    assert callback.measured_bytes is None or torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------
TINY_LLAMA = ('{"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, '
              '"num_key_value_heads": 2, "vocab_size": 1000}')


def cli_json(capsys, *argv) -> dict:
    import json

    from memtrace.cli import main

    assert main(["hf:LlamaConfig", "--model-kwargs", TINY_LLAMA, "--format", "json", "--device", "cpu", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_qlora_flags_are_the_python_setup(capsys):
    from memtrace.loading import build_model

    out = cli_json(capsys, "--dtype", "bf16", "--quantize", "nf4", "--lora-r", "4", "--batch-size", "2",
                   "--seq-len", "32", "--optimizer", "adamw8bit")
    model = memtrace.hf.qlora(build_model("hf:LlamaConfig", {"hidden_size": 256, "intermediate_size": 512,
                                                             "num_hidden_layers": 2, "num_attention_heads": 4,
                                                             "num_key_value_heads": 2, "vocab_size": 1000}
                                          ).module.to(torch.bfloat16), r=4)
    r = memtrace.report(model, inputs=token_batch(model, 2, 32), optimizer="adamw8bit", device="cpu")
    assert out["peak_bytes"] == r.peak_bytes
    assert out["trainable_param_count"] == r.trainable_param_count < out["param_count"]


def test_cli_trainer_args(capsys, tmp_path):
    path = tmp_path / "args.json"
    path.write_text('{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "optim": "adamw_torch"}')
    out = cli_json(capsys, "--quantize", "nf4", "--lora-r", "4", "--seq-len", "32", "--trainer-args", str(path))
    assert out["settings"]["accumulation_steps"] == 2
    from memtrace.cli import main

    with pytest.raises(SystemExit):
        main(["hf:LlamaConfig", "--model-kwargs", TINY_LLAMA, "--seq-len", "32", "--trainer-args", str(path),
              "--optimizer", "sgd"])
    assert "read from --trainer-args" in capsys.readouterr().err


def test_levers_and_variants_know_the_fine_tuning_settings():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    inputs = token_batch(model, 2, 64)
    base = memtrace.report(model, inputs=inputs, optimizer="adamw")
    lv = memtrace.levers(model, inputs=inputs, optimizer="adamw", limit=base.peak_bytes // 2)
    by_label = {lever.label: lever for lever in lv.levers}
    eight_bit = by_label["8-bit AdamW (bitsandbytes)"]
    assert eight_bit.report.peak_bytes == memtrace.report(model, inputs=inputs, optimizer="adamw8bit").peak_bytes
    assert by_label["paged 8-bit AdamW (large states in unified memory)"].saves_bytes > 0
    qlora = by_label["QLoRA: 4-bit base + LoRA r=16 (adapters only)"]
    assert qlora.report.trainable_param_count < qlora.report.param_count
    assert qlora.report.peak_bytes == memtrace.report(memtrace.hf.qlora(qlora_base(), r=16), inputs=inputs,
                                                      optimizer="adamw").peak_bytes
    from memtrace.quantized import uses_bitsandbytes

    assert not uses_bitsandbytes(model) and all(p.requires_grad for p in model.parameters())  # a copy was set up
    cmp = memtrace.compare(model, inputs=inputs, optimizer="adamw", variants=["adamw", "adamw8bit", "qlora"])
    assert [row.peak_bytes for row in cmp.rows] == [base.peak_bytes, eight_bit.report.peak_bytes,
                                                    qlora.report.peak_bytes]


def qlora_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))


def test_sharded_and_compiled_4bit_steps_are_refused():
    with pytest.raises(ValueError, match="parallel= with bitsandbytes 4-bit weights"):
        memtrace.report(TwoLinears(), (4, 256), parallel={"fsdp": 2}, device="cpu")
    with pytest.raises(ValueError, match="compile= with bitsandbytes 4-bit weights"):
        memtrace.report(TwoLinears(), (4, 256), compile=True, device="cpu")


def test_a_qlora_stack_is_spliced_to_the_whole_trace(monkeypatch):
    # peft keeps the base model's prepare_inputs_for_generation bound to it, and the 8-bit optimizer's maps are
    # shared by every parameter's state: neither may tie the cut model to the whole one
    from transformers import LlamaConfig, LlamaForCausalLM

    from memtrace import depth

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=500))
    model = memtrace.hf.qlora(model.to(torch.bfloat16), r=4)
    kw = dict(inputs=token_batch(model, 2, 16), optimizer="paged_adamw8bit", amp="bf16", device="cuda")
    monkeypatch.setattr(depth, "MIN_LAYERS", 5)
    from memtrace.options import parse_options

    options = parse_options(model, **kw)
    stack = depth.find_stack(model, options)
    assert stack is not None and stack.length == 6
    spliced = depth.splice(model, options, stack)  # raises NoSplice where the traces do not line up
    assert depth.difference(spliced, memtrace.engine.trace(model, options)) is None


def test_fine_tuning_levers_are_offered_where_they_apply():
    from transformers import GPT2Config, GPT2LMHeadModel

    from memtrace.whatif import _fine_tuning_levers

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100))
    labels = [label for label, _ in _fine_tuning_levers(qlora_base(), {"optimizer": "AdamW"}, None, "cuda")]
    assert labels == ["8-bit AdamW (bitsandbytes)", "paged 8-bit AdamW (large states in unified memory)",
                      "QLoRA: 4-bit base + LoRA r=16 (adapters only)"]
    # GPT-2's layers are Conv1D (its one Linear is the output head, which stays unquantised); on the CPU nothing
    # is paged; SGD has no state to shrink; a model trained already as LoRA is not set up again
    assert [label for label, _ in _fine_tuning_levers(gpt2, {"optimizer": "AdamW"}, None, "cpu")] == [
        "8-bit AdamW (bitsandbytes)"]
    assert _fine_tuning_levers(qlora_llama(meta=True), {"optimizer": "SGD"}, None, "cuda") == []
