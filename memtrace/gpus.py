"""A small catalog of GPUs: the memory a card has and the compute capability that decides what CUDA does
on it (which attention kernels exist, the cuBLAS workspace size)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

GiB = 2**30
MiB = 2**20

# What a training process cannot use for tensors, subtracted from a card's memory to give the memory a
# predicted allocated peak may reach (``GPU.usable_bytes``); both can be overridden per call.
# - The CUDA context and the kernels of the CUDA libraries it loads live outside PyTorch's allocator
#   (nvidia-smi shows them; max_memory_allocated does not): a few hundred MiB with lazy module loading,
#   over 1 GiB without it.
CONTEXT_ALLOWANCE_BYTES = 1 * GiB
# - The caching allocator reserves whole segments, so reserved memory exceeds the allocated peak; the
#   share of the remaining memory kept for that gap.
FRAGMENTATION_ALLOWANCE = 0.05


# Resident threads per SM by compute capability (CUDA programming guide, "Technical Specifications per
# Compute Capability"); CUDA's reduction kernel sizes its grid, and so its scratch, by it.
_THREADS_PER_SM = {(7, 0): 2048, (7, 2): 2048, (7, 5): 1024, (8, 0): 2048, (8, 6): 1536, (8, 7): 1536,
                   (8, 9): 1536, (9, 0): 2048, (10, 0): 2048, (10, 3): 2048, (12, 0): 1536, (12, 1): 1536}


@dataclass(frozen=True)
class GPU:
    """A card: ``GPU("RTX A4000", "15.7 GiB", (8, 6))``. ``memory_bytes`` is the memory PyTorch reports on it
    (an int of bytes, or a size such as "24 GiB"), ``capability`` its compute capability (major, minor)."""

    name: str
    memory_bytes: int  # the memory PyTorch reports (get_device_properties().total_memory)
    capability: tuple[int, int]
    # multiProcessorCount; None: the catalog's card of the same compute capability (see ``sm_count``)
    multiprocessors: int | None = None

    def __post_init__(self):
        from .units import parse_size

        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"GPU name={self.name!r} must be a non-empty string")
        memory = self.memory_bytes
        if isinstance(memory, str):
            try:
                memory = parse_size(memory)
            except ValueError as exc:
                raise ValueError(f"GPU {self.name!r}: memory_bytes={memory!r}: {exc}") from None
        if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
            raise ValueError(f"GPU {self.name!r}: memory_bytes={self.memory_bytes!r} must be a positive number of "
                             "bytes or a size such as '24 GiB'")
        object.__setattr__(self, "memory_bytes", memory)
        cap = self.capability
        if (not isinstance(cap, (tuple, list)) or len(cap) != 2
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cap) or cap[0] < 3):
            raise ValueError(f"GPU {self.name!r}: capability={cap!r} must be the compute capability as (major, "
                             "minor), e.g. (8, 6) for an RTX A4000")
        object.__setattr__(self, "capability", (cap[0], cap[1]))
        sms = self.multiprocessors
        if sms is not None and (isinstance(sms, bool) or not isinstance(sms, int) or sms < 1):
            raise ValueError(f"GPU {self.name!r}: multiprocessors={sms!r} must be a positive int or None")

    @property
    def sm_count(self) -> int:
        """Streaming multiprocessors: the card's own count, else that of the catalog's first card of the
        same compute capability (an assumption: parts of one generation differ, e.g. H100 SXM 132 and
        PCIe 114), else 108."""
        if self.multiprocessors:
            return self.multiprocessors
        same = [g for g in _CATALOG if g.capability == self.capability and g.multiprocessors]
        return same[0].multiprocessors if same else 108

    @property
    def threads_per_sm(self) -> int:
        """Resident threads per SM (maxThreadsPerMultiProcessor), by compute capability."""
        return _THREADS_PER_SM.get(self.capability, 2048 if self.capability[0] in (7, 8, 9, 10) else 1536)

    def usable_bytes(self, context_bytes: int = CONTEXT_ALLOWANCE_BYTES,
                     fragmentation: float = FRAGMENTATION_ALLOWANCE) -> int:
        """The allocated peak this card can hold: its memory less the CUDA context and a fragmentation
        share (reserved minus allocated) of what is left."""
        if context_bytes < 0 or not 0 <= fragmentation < 1:
            raise ValueError(f"context_bytes must be >= 0 and 0 <= fragmentation < 1, got {context_bytes}, "
                             f"{fragmentation}")
        return int((self.memory_bytes - context_bytes) * (1 - fragmentation))

    def peak_tflops(self, precision: str) -> float | None:
        """Datasheet peak dense throughput for ``precision`` ("fp32", "tf32", "fp16", "bf16"), in TFLOPS;
        None where the card has no such unit (TF32 and bf16 before Ampere) or is not in the table."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is unknown; valid: {', '.join(map(repr, PRECISIONS))}")
        row = PEAK_DENSE_TFLOPS.get(self.name)
        return None if row is None else row[PRECISIONS.index(precision)]

    @property
    def sm(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}"

    def cublas_workspace_bytes(self, environ=os.environ) -> int:
        """The cuBLAS workspace PyTorch allocates per (handle, stream) at the first GEMM.

        aten/src/ATen/cuda/CublasHandlePool.cpp, getChosenWorkspaceSize: CUBLAS_WORKSPACE_CONFIG
        (":SIZE_KiB:COUNT" pairs, summed) if set, else ":4096:8" (32 MiB) on compute capability 9.x and
        newer and ":4096:2:16:8" (8 MiB + 128 KiB) before."""
        config = environ.get("CUBLAS_WORKSPACE_CONFIG")
        if config:
            pairs = re.findall(r":(\d+):(\d+)", config)
            if pairs:
                return sum(int(size) * int(count) for size, count in pairs) * 1024
        if self.capability >= (9, 0):
            return 4096 * 8 * 1024
        return (4096 * 2 + 16 * 8) * 1024


# Memory is what PyTorch reports on the card, get_device_properties().total_memory, which its
# out-of-memory messages quote as "total capacity": less than the nominal size, since the driver keeps
# some, and a few MiB lower or higher with the driver version and ECC. These are the lowest values seen on
# Linux in logs users published (PyTorch's _CudaDeviceProperties, deviceQuery, Ultralytics' device line).
# For the H100 it is the PCIe part's; the SXM part reports 81,079-81,105 MiB. SM counts are from NVIDIA's
# datasheets and whitepapers; the H100's is the SXM part's (132; PCIe: 114), the training part.
_CATALOG = [
    GPU("H100", 81_008 * MiB, (9, 0), 132),
    GPU("H200", 143_156 * MiB, (9, 0), 132),
    GPU("B200", 182_631 * MiB, (10, 0), 148),
    GPU("A100-80GB", 81_037 * MiB, (8, 0), 108),
    GPU("A100-40GB", 40_326 * MiB, (8, 0), 108),
    GPU("L40S", 45_372 * MiB, (8, 9), 142),
    GPU("L4", 22_518 * MiB, (8, 9), 58),
    GPU("A10G", 22_587 * MiB, (8, 6), 80),
    GPU("A6000", 48_676 * MiB, (8, 6), 84),
    GPU("A5000", 24_114 * MiB, (8, 6), 64),
    GPU("RTX 5090", 32_101 * MiB, (12, 0), 170),
    GPU("RTX 4090", 24_080 * MiB, (8, 9), 128),
    GPU("RTX 3090", 24_124 * MiB, (8, 6), 82),
    GPU("V100-32GB", 32_480 * MiB, (7, 0), 80),
    GPU("T4", 14_912 * MiB, (7, 5), 40),
]
DEFAULT_GPU = "H100"

# Peak dense TFLOPS (no structured sparsity) from NVIDIA's datasheets and architecture whitepapers, as
# (fp32, tf32 tensor core, fp16 tensor core, bf16 tensor core). H100, H200 and A100 are the SXM parts; the
# B200 figures are the HGX B200 totals divided by 8. GeForce and RTX workstation cards give fp16/bf16 with
# fp32 accumulation (what training uses), which is half their fp16-accumulate figure on GeForce parts.
# A10G (AWS's variant of the A10) has no NVIDIA datasheet and is left out.
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
PEAK_DENSE_TFLOPS: dict[str, tuple[float | None, ...]] = {
    "H100": (67.0, 494.7, 989.4, 989.4),
    "H200": (67.0, 494.7, 989.4, 989.4),
    "B200": (75.0, 1125.0, 2250.0, 2250.0),
    "A100-80GB": (19.5, 156.0, 312.0, 312.0),
    "A100-40GB": (19.5, 156.0, 312.0, 312.0),
    "L40S": (91.6, 183.0, 362.1, 362.1),
    "L4": (30.3, 60.0, 121.0, 121.0),
    "A6000": (38.7, 77.4, 154.8, 154.8),
    "A5000": (27.8, 55.6, 111.1, 111.1),
    "RTX 5090": (104.8, 104.8, 209.5, 209.5),
    "RTX 4090": (82.6, 82.6, 165.2, 165.2),
    "RTX 3090": (35.6, 35.6, 71.0, 71.0),
    "V100-32GB": (15.7, None, 125.0, None),
    "T4": (8.1, None, 65.0, None),
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


GPUS: dict[str, GPU] = {_key(g.name): g for g in _CATALOG}
# common spellings of the same cards
GPUS.update({_key("A100"): GPUS[_key("A100-80GB")], _key("V100"): GPUS[_key("V100-32GB")],
             _key("H100-80GB"): GPUS[_key("H100")], _key("4090"): GPUS[_key("RTX 4090")],
             _key("3090"): GPUS[_key("RTX 3090")], _key("5090"): GPUS[_key("RTX 5090")]})


def lookup(name) -> GPU:
    if isinstance(name, GPU):
        return name
    gpu = GPUS.get(_key(str(name)))
    if gpu is None:
        raise ValueError(f"gpu={name!r} is unknown; valid: {', '.join(repr(g.name) for g in _CATALOG)}")
    return gpu


def present() -> GPU | None:
    """The current CUDA device as a GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return GPU(props.name, props.total_memory, (props.major, props.minor), props.multi_processor_count)
