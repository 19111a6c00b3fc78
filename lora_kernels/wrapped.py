"""LoRA around a linear layer that lora_kernels does not compute itself.

``WrappedLinear(base_layer, r, lora_alpha, lora_dropout)`` holds a base layer
mapping (..., in_features) → (..., out_features) — a bitsandbytes 4-bit NF4/FP4
``Linear4bit`` or 8-bit ``Linear8bitLt`` (QLoRA), or any other module — and
adds the low-rank branch to its output with the ``lora_delta`` op:

    y = base_layer(x) + (α/r)·dropout(x)·Aᵀ·Bᵀ

The base runs as its own module (its quantized kernels, its hooks); W stays as
the base stores it and is never dequantized into a kept copy. ``lora_A`` (r,
in) and ``lora_B`` (out, r) are loralib's names, shapes and initialisation,
kept in float32 (as PEFT keeps them for a quantized base) and cast to the base
output's dtype for the op (r×in and out×r copies, differentiable), so x is
never copied. Backward holds x, s = dropout(x)·Aᵀ (tokens×r) and the dropout
seed: no dropped copy of x and no mask.

No merging: ``eval()`` runs the branch unmerged. W + ΔW would have to be
quantized again: a 4-bit base keeps 16 levels per 64-weight block scaled by the
block's absmax, an 8-bit one 256 levels per row, so a small ΔW (LoRA's usual
size) is mostly rounded away and every merge/unmerge round trip changes W.
PEFT merges anyway with a warning; we refuse (``merge_weights=True`` raises).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional as LF
from .layers import LoRALayer, _check_r

# The parameter class of a bitsandbytes 4-bit weight (packed: two codes per byte).
_PARAMS_4BIT = "Params4bit"


def _features(base: nn.Module):
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not (isinstance(in_f, int) and isinstance(out_f, int) and in_f > 0 and out_f > 0):
        raise ValueError(f"base_layer: got a {type(base).__name__} without positive integer "
                         f"in_features/out_features (got {in_f!r}, {out_f!r}), expected a "
                         "linear layer such as bitsandbytes Linear4bit")
    return in_f, out_f


def dense_numel(p: torch.Tensor) -> int:
    """How many weights a parameter holds (a 4-bit one packs two per byte)."""
    if type(p).__name__ == _PARAMS_4BIT:
        return p.numel() * 2 * p.element_size()
    return p.numel()


class WrappedLinear(LoRALayer, nn.Module):
    """LoRA around ``base_layer``, a linear layer computed by its own module
    (see the module docstring). ``lora_A``/``lora_B`` are float32 unless
    ``dtype`` says otherwise; ``merge_weights`` must stay False."""

    def __init__(self, base_layer: nn.Module, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0., merge_weights: bool = False,
                 device=None, dtype: torch.dtype = torch.float32):
        _check_r(r)
        LF.check_dropout(lora_dropout)
        if not isinstance(base_layer, nn.Module):
            raise ValueError(f"base_layer: got {type(base_layer).__name__}, expected an "
                             "nn.Module (a linear layer)")
        in_f, out_f = _features(base_layer)
        if merge_weights is not False:
            raise ValueError(
                f"merge_weights: got {merge_weights!r}, expected False for a "
                f"{type(base_layer).__name__} base: merging would quantize W + ΔW again, "
                "which rounds most of a small ΔW away (4-bit: 16 levels per 64-weight "
                "block) and changes W on every merge/unmerge; the branch runs unmerged")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: got {dtype!r}, expected a floating torch.dtype "
                             "for lora_A and lora_B")
        nn.Module.__init__(self)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=False)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = False
        if device is None:
            device = next((t.device for t in base_layer.parameters()), torch.device("cpu"))
        if r > 0:
            self.lora_A = nn.Parameter(torch.zeros(r, in_f, device=device, dtype=dtype))
            self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=device, dtype=dtype))
            self.scaling = self.lora_alpha / self.r
            self.reset_lora_parameters()

    def _merge_args(self):
        raise ValueError(f"{type(self).__name__}: merging ΔW into a "
                         f"{type(self.base_layer).__name__} base is refused (it would be "
                         "quantized again and mostly rounded away); the branch runs unmerged")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.r == 0:
            return y
        dtype = y.dtype
        if x.dtype != dtype:  # a base whose output dtype is not its input's
            x = x.to(dtype)
        return LF.lora_delta(x, y, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling,
                             self._dropout_p(), self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}")
