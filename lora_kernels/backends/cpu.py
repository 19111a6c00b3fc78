"""The CPU backend: C++ kernels from ``csrc/cpu`` (extension ``lora_kernels._C``).

They are registered under ``torch.ops.lora_kernels_cpu`` with the argument
lists of the op contract in ``lora_kernels/ops.py``.
"""
from __future__ import annotations

import torch

NAME = "cpu"

_IMPORT_ERROR = None
try:
    from .. import _C  # noqa: F401  (loads the library; registers the kernels)
except ImportError as e:  # not built: import still works, auto falls back
    _IMPORT_ERROR = e


def not_supported_reasons(device: torch.device):
    why = []
    if _IMPORT_ERROR is not None:
        why.append(f"the compiled extension lora_kernels._C is not built ({_IMPORT_ERROR}); "
                   "run `pip install --no-build-isolation -e .`")
    if device.type != "cpu":
        why.append(f"runs on CPU tensors only, got {device.type}")
    return why


def _ops():
    return torch.ops.lora_kernels_cpu


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
