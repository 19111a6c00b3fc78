"""The CPU backend: C++ kernels from ``csrc/cpu`` (extension ``lora_kernels._C``).

They are registered under ``torch.ops.lora_kernels_cpu`` with the argument
lists of the op contract in ``lora_kernels/ops.py``.
"""
from __future__ import annotations

import torch

from .forward import forwarders

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


(lora_linear_fwd, lora_linear_bwd, lora_embedding_fwd, lora_embedding_bwd, merge_,
 dropout, lora_delta_fwd, lora_delta_bwd) = forwarders(_ops)
