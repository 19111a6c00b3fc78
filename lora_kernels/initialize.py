"""Fresh adapters for a model built on the meta device: ``reset_lora_parameters``.

Large models are built without memory and sharded before they get any::

    with torch.device("meta"):
        model = build()                       # lora_kernels layers, or a PEFT model
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cuda")             # storage, values undefined
    set_model_state_dict(model, pretrained, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=False))   # W and biases
    torch.manual_seed(0)                      # the same seed on every rank
    lora_kernels.reset_lora_parameters(model) # A and B, as at construction

After ``to_empty`` the LoRA tensors hold whatever was in memory, and the
pretrained checkpoint has none of them. ``reset_lora_parameters`` gives them
the values their constructor gives (loralib's initialisation for lora_kernels
layers, PEFT's ``init_lora_weights`` for PEFT's LoRA layers), leaving every
other tensor alone. Sharded (DTensor) tensors are drawn whole on every rank,
each rank keeping its block (``distributed.init_full_``): the result is the
single-process one for the same seed, where DTensor's own random ops on a
CPU mesh would give every shard the same rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import distributed
from . import functional as LF
from .layers import LoRALayer

# PEFT's init_lora_weights values that only set lora_A / lora_B (others,
# such as "pissa" or "olora", also rewrite the base weight).
_PEFT_INITS = (True, False, "gaussian")


def _peft_layers(model: nn.Module):
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _peft_init(model: nn.Module, adapter: str):
    config = getattr(model, "peft_config", {}).get(adapter)
    return True if config is None else config.init_lora_weights


def _reset_peft_layer(name: str, layer, adapter: str, init) -> None:
    """PEFT's ``reset_lora_parameters(adapter, init)``, on whole tensors."""
    if init not in _PEFT_INITS:
        raise ValueError(f"init_lora_weights of adapter {adapter!r} ({name}): got {init!r}, "
                         f"expected one of {_PEFT_INITS} (other initialisations also change "
                         "the base weight; run PEFT's own on an unsharded model)")
    if adapter in layer.lora_A:
        mA, mB = layer.lora_A[adapter], layer.lora_B[adapter]
        if init is False:  # PEFT keeps the sub-modules' own default initialisation
            for m in (mA, mB):
                _reset_module(m)
            return
        if init is True:
            distributed.init_full_(mA.weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        else:
            std = 1 / layer.r[adapter]
            distributed.init_full_(mA.weight, lambda t: nn.init.normal_(t, std=std))
        distributed.init_full_(mB.weight, nn.init.zeros_)
        if getattr(mB, "bias", None) is not None:
            distributed.init_full_(mB.bias, nn.init.zeros_)
        dora = getattr(layer, "lora_magnitude_vector", None)
        if dora is not None and adapter in dora and not isinstance(layer, nn.Embedding):
            _reset_dora_magnitude(layer, adapter)
    if adapter in layer.lora_embedding_A:
        # PEFT creates both as N(0, 1); its default initialisation then zeroes A.
        A_init = nn.init.normal_ if init is False else nn.init.zeros_
        distributed.init_full_(layer.lora_embedding_A[adapter], A_init)
        distributed.init_full_(layer.lora_embedding_B[adapter], nn.init.normal_)


def _reset_dora_magnitude(layer, adapter: str) -> None:
    """PEFT's DoRA start: magnitude = ‖W + s·B·A‖ per output row (from the
    whole, loaded W), for a Linear or Conv1D base."""
    base = layer.get_base_layer()
    weight = distributed.full(base.weight.detach())
    if weight.dim() != 2:
        return  # DoRA on convolutions: PEFT's own initialisation
    mA, mB = layer.lora_A[adapter], layer.lora_B[adapter]
    norm = LF.dora_weight_norm(weight, distributed.full(mA.weight.detach()).to(weight.dtype),
                               distributed.full(mB.weight.detach()).to(weight.dtype),
                               layer.scaling[adapter], getattr(layer, "fan_in_fan_out", False))
    magnitude = layer.lora_magnitude_vector[adapter].weight
    distributed.copy_full_(magnitude, norm.to(magnitude.dtype))


def _reset_module(m: nn.Module) -> None:
    """``m.reset_parameters()`` of an nn.Linear / nn.ConvNd on whole tensors."""
    fan_in = math.prod(m.weight.shape[1:])
    distributed.init_full_(m.weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
    if getattr(m, "bias", None) is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        distributed.init_full_(m.bias, lambda t: nn.init.uniform_(t, -bound, bound))


@torch.no_grad()
def reset_lora_parameters(model: nn.Module) -> int:
    """Initialise every adapter of ``model`` (lora_kernels layers, AdaLoRA
    ``SVDLinear``, PEFT LoRA layers) as its constructor does, and nothing
    else. Sharded (FSDP2) parameters are supported; call it on every rank
    with the same seed. Returns the number of layers initialised."""
    count = 0
    for m in model.modules():
        if isinstance(m, LoRALayer) and hasattr(m, "lora_A"):
            m.reset_lora_parameters()
            count += 1
    for name, layer in _peft_layers(model):
        adapters = list(layer.lora_A.keys()) + list(layer.lora_embedding_A.keys())
        for adapter in adapters:
            _reset_peft_layer(name, layer, adapter, _peft_init(model, adapter))
        count += bool(adapters)
    return count
