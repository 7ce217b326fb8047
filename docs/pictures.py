"""Draws the pictures of a step in docs/python.md and writes the matching snapshots: ``python docs/pictures.py``.

A 50-layer CNN (torchvision's ResNet-50, batch 32, Adam) and a 32-layer LLaMA-style language model
(hidden size 1024, sequence 1024, batch 8, AdamW, bf16 autocast), both built on the meta device and
predicted for the default GPU. The snapshots go to the working directory (they are not kept in git).
"""

from __future__ import annotations

from pathlib import Path

import torch

import memtrace

HERE = Path(__file__).parent


def resnet50():
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return memtrace.report(model, input_shape=(32, 3, 224, 224), optimizer="adam")


def llama_32_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=32, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    ids = torch.empty(8, 1024, dtype=torch.long, device="meta")
    return memtrace.report(model, inputs={"input_ids": ids, "labels": ids}, optimizer="adamw", amp="bf16")


if __name__ == "__main__":
    for name, make in (("resnet50", resnet50), ("llama-32-layers", llama_32_layers)):
        report = make()
        report.plot(HERE / f"step-{name}.png")
        report.save_snapshot(f"step-{name}.pickle")
        print(f"{name}: peak {memtrace.format_bytes(report.peak_bytes, 2)}, docs/step-{name}.png, "
              f"step-{name}.pickle")
