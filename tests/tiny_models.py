"""Tiny models shared by the memtrace tests (imported as ``tiny_models``; tests/ is on sys.path).

Every model here traces in well under a second; the Hugging Face ones use the configs the test plan
fixed: 2 layers, hidden 64, vocabulary 1000, fed (2, 32) int64 token batches.
"""

from __future__ import annotations

import torch
from torch import nn


def make_mlp() -> nn.Sequential:
    """Linear(4, 8) -> ReLU -> Linear(8, 2): 4*8 + 8 + 8*2 + 2 = 58 parameters, 232 B in float32."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def make_cnn(channels: int = 8, hw: int = 32) -> nn.Sequential:
    """Two conv blocks (Conv-BN-ReLU-MaxPool) and a linear head, for inputs (N, 3, hw, hw)."""
    torch.manual_seed(0)
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c * (hw // 4) ** 2, 10),
    )


def token_batch() -> dict[str, torch.Tensor]:
    """Causal-LM / MLM batch: token ids and labels, both (2, 32) int64 (id 0 is valid in every vocabulary)."""
    return {"input_ids": torch.zeros(2, 32, dtype=torch.long), "labels": torch.zeros(2, 32, dtype=torch.long)}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0))


def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, vocab_size=1000, max_position_embeddings=64))


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, d_kv=16,
                                               num_heads=4, vocab_size=1000, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                            num_local_experts=4, num_experts_per_tok=2,
                                            max_position_embeddings=64, bos_token_id=0, eos_token_id=0))


class GroupedExperts(nn.Module):
    """Three experts' [n, 8] weights applied to the rows 0-3, 4-5 and 6-11 of a [12, 8] input in one
    torch._grouped_mm call, with the weights transposed as Hugging Face's mixture-of-experts layers keep
    them (PyTorch 2.8 and later)."""

    def __init__(self, n: int):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, n, 8))

    def forward(self, x):
        offs = torch.tensor([4, 6, 12], dtype=torch.int32)
        return torch._grouped_mm(x, self.w.transpose(-2, -1), offs=offs)


class NormBlock(nn.Module):
    """Linear, a norm, Linear, all ``width`` wide: what the norm keeps for backward, and its statistics'
    dtype, make the difference between the CPU's kernels and the GPU's."""

    def __init__(self, norm: nn.Module, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = nn.Linear(width, width), norm, nn.Linear(width, width)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


class EvenExperts(nn.Module):
    """``experts`` experts' [width, hidden] weights over an even split of the input's rows (the input
    flattened to [rows, width]) in one torch._grouped_mm call, the weights transposed as Hugging Face keeps
    them (PyTorch 2.8 and later)."""

    def __init__(self, experts: int = 8, width: int = 2048, hidden: int = 1024):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(experts, hidden, width) * 0.02)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        experts = self.w.shape[0]
        offs = torch.arange(1, experts + 1, dtype=torch.int32, device=x.device) * (rows.shape[0] // experts)
        return torch._grouped_mm(rows, self.w.transpose(-2, -1), offs=offs)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


HF_MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert, "t5": tiny_t5}
