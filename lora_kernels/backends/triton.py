"""The Triton backend (GPU, or CPU tensors under TRITON_INTERPRET=1).

Its kernels are not part of this release yet; this module reports why it
cannot run, so ``python -m lora_kernels.info`` and forced selection say so.
"""
from __future__ import annotations

import importlib.util
import os

import torch

NAME = "triton"


def not_supported_reasons(device: torch.device):
    why = []
    if importlib.util.find_spec("triton") is None:
        why.append("triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why.append("no GPU and TRITON_INTERPRET is not set")
    elif device.type not in ("cpu", "cuda"):
        why.append(f"runs on cuda tensors (or cpu under TRITON_INTERPRET=1), got {device.type}")
    elif device.type == "cuda" and not torch.cuda.is_available():
        why.append("CUDA is not available")
    why.append("the Triton kernels are not included in this version")
    return why
