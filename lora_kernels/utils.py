"""loralib's helpers: freeze all but LoRA, and the LoRA-only state dict."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .layers import LoRALayer

BIAS_MODES = ("none", "all", "lora_only")


class BiasModeError(ValueError, NotImplementedError):
    """A ``bias`` argument outside BIAS_MODES (loralib raised NotImplementedError)."""


def _check_bias(bias) -> None:
    if bias not in BIAS_MODES:
        expected = ", ".join(map(repr, BIAS_MODES))
        raise BiasModeError(f"bias: got {bias!r}, expected one of {expected}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks ``lora_``; with ``bias='all'``
    train every bias, with ``'lora_only'`` the biases of LoRA layers."""
    _check_bias(bias)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.requires_grad = False
    if bias == "all":
        for n, p in model.named_parameters():
            if "bias" in n:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LoRALayer) and getattr(m, "bias", None) is not None:
                m.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The LoRA tensors of ``model.state_dict()`` (plus biases per ``bias``)."""
    _check_bias(bias)
    sd = model.state_dict()
    if bias == "none":
        return {k: sd[k] for k in sd if "lora_" in k}
    if bias == "all":
        return {k: sd[k] for k in sd if "lora_" in k or "bias" in k}
    out = {}
    for k in sd:
        if "lora_" in k:
            out[k] = sd[k]
            bias_name = k.split("lora_")[0] + "bias"
            if bias_name in sd:
                out[bias_name] = sd[bias_name]
    return out
