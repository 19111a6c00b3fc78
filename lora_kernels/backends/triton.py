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


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
                    fan_in_fan_out, num_groups, groups):
    return _ops().lora_linear_fwd(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
                                  fan_in_fan_out, num_groups, groups)


def lora_linear_bwd(grad, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p,
                    fan_in_fan_out, num_groups, groups, output_mask):
    return _ops().lora_linear_bwd(grad, x, weight, lora_A, lora_B, s, seed, scaling,
                                  dropout_p, fan_in_fan_out, num_groups, groups, output_mask)


def lora_embedding_fwd(indices, weight, lora_A, lora_B, scaling):
    return _ops().lora_embedding_fwd(indices, weight, lora_A, lora_B, scaling)


def lora_embedding_bwd(grad, indices, weight, lora_A, lora_B, s, scaling, padding_idx,
                       output_mask):
    return _ops().lora_embedding_bwd(grad, indices, weight, lora_A, lora_B, s, scaling,
                                     padding_idx, output_mask)


def merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out, num_groups, groups):
    _ops().merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out, num_groups, groups)


def dropout(x, seed, p):
    return _ops().dropout(x, seed, p)
