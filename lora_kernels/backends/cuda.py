"""The CUDA C++ backend (csrc/cuda, built with LORA_KERNELS_CUDA=1).

Its kernels are not part of this release yet; this module reports why it
cannot run, so ``python -m lora_kernels.info`` and forced selection say so.
"""
from __future__ import annotations

import torch

NAME = "cuda"


def not_supported_reasons(device: torch.device):
    why = []
    if device.type != "cuda":
        why.append(f"runs on cuda tensors only, got {device.type}")
    elif not torch.cuda.is_available():
        why.append("CUDA is not available")
    why.append("the CUDA C++ kernels are not included in this version")
    return why
