"""The Triton backend: kernels from ``lora_kernels/triton`` (one op per file,
registered as ``torch.ops.lora_kernels_triton.*`` with ``triton_op``).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the
interpreter: slow, for tests). The op modules are imported on first use, so
the environment variable only has to be set before the first op runs.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .forward import forwarders

NAME = "triton"
# Its ops are triton_ops: under torch.compile, lora_kernels.ops decomposes into
# them so the compiler sees the kernels.
TRACEABLE = True

_loaded = False


def not_supported_reasons(device: torch.device):
    why = []
    if importlib.util.find_spec("triton") is None:
        why.append("triton is not installed")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            why.append("no GPU and TRITON_INTERPRET is not set")
    elif device.type != "cuda":
        why.append(f"runs on cuda tensors (or cpu under TRITON_INTERPRET=1), got {device.type}")
    elif not torch.cuda.is_available():
        why.append("CUDA is not available")
    return why


def _ops():
    global _loaded
    if not _loaded:
        from .. import triton as kernels

        kernels.load()
        _loaded = True
    return torch.ops.lora_kernels_triton


(lora_linear_fwd, lora_linear_bwd, lora_embedding_fwd, lora_embedding_bwd, merge_,
 dropout, lora_delta_fwd, lora_delta_bwd) = forwarders(_ops)
