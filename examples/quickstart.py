"""Print memtrace's report for two built-in models: a ResNet-18-shaped CNN and a small GPT.

Both are built on the meta device: nothing of their size is allocated, and no GPU is needed.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memtrace  # noqa: E402
from models import small_resnet, tiny_gpt  # noqa: E402


def main() -> None:
    with torch.device("meta"):
        cnn = small_resnet()
        gpt = tiny_gpt()
    print(memtrace.report(cnn, input_shape=(64, 3, 224, 224), optimizer="adam").table(depth=2))
    print("\n" + "=" * 100 + "\n")
    tokens = torch.empty(8, 1024, dtype=torch.long, device="meta")
    print(memtrace.report(gpt, inputs={"input_ids": tokens, "labels": tokens}, optimizer="adamw", amp="bf16")
          .table(depth=1))


if __name__ == "__main__":
    main()
