"""The benchmark suite: real models built from code and configs only (nothing is downloaded).

Each ``Case`` is a name, a factory that builds the model (real, randomly initialised, on whatever
device is current, so ``with torch.device("meta"): case.factory()`` builds it without memory) and the
inputs of one training step: a shape tuple (one float tensor, passed as ``input_shape=``) or a dict of
meta tensors (keyword inputs, passed as ``inputs=``). Sizes are chosen so that the real CPU run of two
training steps takes a few seconds on a 2-core machine; the widths are realistic, the depths are not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[], nn.Module]
    inputs: Any  # tuple shape (one float input) or dict name -> meta tensor
    quick: bool = False  # part of the --quick subset

    def report_kwargs(self) -> dict[str, Any]:
        """The input arguments for ``memtrace.report`` / ``measure_cpu``."""
        if isinstance(self.inputs, tuple):
            return {"input_shape": self.inputs}
        return {"inputs": self.inputs}

    def make_inputs(self, device: str | torch.device = "meta") -> tuple[list, dict]:
        """(args, kwargs) for calling the model on ``device`` (zeros for integer inputs)."""
        if isinstance(self.inputs, tuple):
            return [torch.empty(self.inputs, device=device)], {}
        return [], {k: torch.zeros(t.shape, dtype=t.dtype, device=device) for k, t in self.inputs.items()}

    def describe_inputs(self) -> str:
        if isinstance(self.inputs, tuple):
            return "x" + str(list(self.inputs))
        return ", ".join(f"{k}{list(t.shape)}" for k, t in self.inputs.items())


def _tokens(batch: int, seq: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.empty(batch, seq, dtype=torch.long, device="meta"),
        "labels": torch.empty(batch, seq, dtype=torch.long, device="meta"),
    }


# ---- torchvision ------------------------------------------------------------------------------------

def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    build.__name__ = f"torchvision.models.{name}"
    return build


# ---- Hugging Face -------------------------------------------------------------------------------------

def gpt2(n_embd=768, n_layer=4, n_head=12, vocab=16000, n_positions=1024) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=n_positions)
    return GPT2LMHeadModel(cfg)


def bert(hidden=512, layers=4, heads=8, intermediate=2048, vocab=16000) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=512)
    return BertForMaskedLM(cfg)


def llama(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=16000, max_pos=2048) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_pos)
    return LlamaForCausalLM(cfg)


def llama_7b() -> nn.Module:
    """LLaMA-7B's shape (6.7 B parameters). Build it under ``torch.device("meta")``."""
    return llama(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, max_pos=4096)


def llama_70b() -> nn.Module:
    """LLaMA-2-70B's shape (69 B parameters; grouped-query attention, 8 key/value heads). Build it under
    ``torch.device("meta")``."""
    return llama(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000, max_pos=4096)


def mixtral(hidden=512, intermediate=1024, layers=4, heads=8, kv_heads=2, experts=8, top_k=2,
            vocab=16000) -> nn.Module:
    """A mixture-of-experts language model; transformers 5 runs its experts through torch._grouped_mm."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                        num_experts_per_tok=top_k, vocab_size=vocab, max_position_embeddings=2048)
    return MixtralForCausalLM(cfg)


def t5(d_model=512, d_ff=2048, layers=2, heads=8, vocab=16000) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=d_model, d_ff=d_ff, d_kv=d_model // heads, num_layers=layers,
                   num_decoder_layers=layers, num_heads=heads, vocab_size=vocab,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg)


# ---- plain PyTorch ------------------------------------------------------------------------------------

class LSTMLanguageModel(nn.Module):
    """Embedding, a stacked LSTM and a tied-size output projection; returns {"loss", "logits"}."""

    def __init__(self, vocab=10000, embed=512, hidden=512, layers=2, dropout=0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, dropout=dropout, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, labels=None):
        h, _ = self.lstm(self.drop(self.embed(input_ids)))
        logits = self.head(self.drop(h))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


class ElementwiseMLP(nn.Module):
    """Linear, a chain of elementwise ops, Linear: a transformer's MLP block with its activation written out.
    The chain reads ``h`` three times (``tanh(h)``, ``h * sigmoid(h)``), so three gradients meet at ``h`` in
    backward and the autograd engine sums the second and the third into the first, in place."""

    def __init__(self, dim=1024, hidden=4096):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        h = F.gelu(self.up(x))
        return self.down(torch.tanh(h) * 0.5 + 1 + h * torch.sigmoid(h))


# ---- the suite ----------------------------------------------------------------------------------------

SUITE: tuple[Case, ...] = (
    Case("resnet18", _tv("resnet18"), (8, 3, 224, 224), quick=True),
    Case("resnet50", _tv("resnet50"), (4, 3, 224, 224)),
    Case("mobilenet_v3_large", _tv("mobilenet_v3_large"), (8, 3, 224, 224)),
    Case("efficientnet_b0", _tv("efficientnet_b0"), (4, 3, 224, 224)),
    Case("densenet121", _tv("densenet121"), (4, 3, 224, 224)),
    Case("vit_b_16", _tv("vit_b_16"), (2, 3, 224, 224)),
    Case("convnext_tiny", _tv("convnext_tiny"), (4, 3, 224, 224)),
    Case("gpt2", gpt2, _tokens(2, 256), quick=True),
    Case("bert_mlm", bert, _tokens(4, 128), quick=True),
    Case("llama", llama, _tokens(2, 256), quick=True),
    Case("llama_gqa", lambda: llama(kv_heads=2), _tokens(2, 256)),
    Case("mixtral", mixtral, _tokens(2, 256)),
    Case("t5", t5, _tokens(2, 128)),
    Case("lstm_lm", LSTMLanguageModel, _tokens(8, 128), quick=True),
    Case("mlp_elementwise", ElementwiseMLP, (1024, 1024), quick=True),
)


# Models at the sizes people train, for a GPU (their real step needs 3 to 35 GiB, the most for the float32
# LLaMA with AdamW): ``accuracy.py --full-size``.
FULL_SIZE: tuple[Case, ...] = (
    Case("resnet50_b64", _tv("resnet50"), (64, 3, 224, 224)),
    Case("vit_b_16_b32", _tv("vit_b_16"), (32, 3, 224, 224)),
    Case("gpt2_124m_b8", lambda: gpt2(n_layer=12, vocab=50257), _tokens(8, 1024)),
    Case("bert_base_b32", lambda: bert(hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522),
         _tokens(32, 512)),
    Case("llama_840m_b2", lambda: llama(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=4,
                                        vocab=32000), _tokens(2, 2048)),
)


def select(only: str | None = None, quick: bool = False, full_size: bool = False) -> list[Case]:
    """The cases to run: one by name (``only``, comma-separated names allowed), the quick subset, or all;
    ``full_size`` picks from FULL_SIZE instead of the suite."""
    suite = FULL_SIZE if full_size else SUITE
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        known = {c.name: c for c in suite}
        missing = [n for n in names if n not in known]
        if missing:
            raise SystemExit(f"unknown case(s) {missing}; valid: {', '.join(known)}")
        return [known[n] for n in names]
    return [c for c in suite if c.quick] if quick else list(suite)
