"""Which PEFT LoRA layers ``patch_peft`` fuses, how, and why not.

A layer's kind comes from the PEFT forward its class runs ("linear", "svd"
for AdaLoRA, "embedding", "conv"); ``_gemm_base`` says whether a Linear's base
is one the fused ``lora_linear`` op computes itself; ``_static_reason`` is what
``patch_peft`` reports for a layer it leaves to PEFT. The per-call checks
live with the forwards (``peft_forward``).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules import module as _nn_module

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _peft():
    try:
        from peft.tuners.adalora import layer as adalora
        from peft.tuners.lora import layer as lora
    except ImportError as e:  # peft is an optional dependency
        raise ImportError("patch_peft needs the `peft` package") from e
    return lora, adalora


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _layer_class(layer) -> type:
    """The layer's class; for a layer given to FSDP2's ``fully_shard``, the
    class FSDP2 derived its own from (``FSDP<name>(FSDPModule, <class>)``)."""
    cls = type(layer)
    if "torch.distributed.fsdp" in sys.modules:
        from torch.distributed.fsdp import FSDPModule
        if FSDPModule in cls.__bases__:
            return next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


# PEFT's LoRA Linear classes for bases it does not compute itself (quantized
# layers); each forward is base_layer(x) + Σ lora_B(lora_A(dropout(x)))·scaling
# (AdaLoRA's: + Σ dropout(x)·(A⊙E)ᵀ·Bᵀ·scaling/(ranknum + 1e-5)), with PEFT's
# input casts. Looked up in sys.modules: a layer of one of these classes means
# its module is imported, and nothing here imports bitsandbytes & co.
_QUANTIZED = {
    "peft.tuners.lora.bnb": ("linear", ("Linear8bitLt", "Linear4bit")),
    "peft.tuners.lora.hqq": ("linear", ("HqqLoraLinear",)),
    "peft.tuners.lora.gptq": ("linear", ("GPTQLoraLinear",)),
    "peft.tuners.lora.awq": ("linear", ("AwqLoraLinear",)),
    "peft.tuners.lora.eetq": ("linear", ("EetqLoraLinear",)),
    "peft.tuners.lora.aqlm": ("linear", ("AqlmLoraLinear",)),
    "peft.tuners.adalora.bnb": ("svd", ("SVDLinear8bitLt", "SVDLinear4bit")),
    "peft.tuners.adalora.gptq": ("svd", ("SVDQuantLinear",)),
}


def _kind(layer) -> Optional[str]:
    """How the layer's forward computes (by the PEFT forward its class runs,
    so subclasses that keep it, e.g. torchao's and INC's, count): "linear",
    "svd" (AdaLoRA), "embedding", "conv", or None (not one we fuse)."""
    lora, adalora = _peft()
    forward = _layer_class(layer).forward
    if forward is lora.Linear.forward:
        return "linear"
    if forward is adalora.SVDLinear.forward:
        return "svd"
    if forward is lora.Embedding.forward:
        return "embedding"
    if forward is lora._ConvNd.forward:
        return "conv"
    for module, (kind, names) in _QUANTIZED.items():
        mod = sys.modules.get(module)
        if mod is not None and any(forward is getattr(getattr(mod, n, None), "forward", None)
                                   for n in names):
            return kind
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _global_hooks() -> bool:
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


def _plain_weight(w) -> bool:
    return type(w) in (torch.Tensor, nn.Parameter) and w.dtype in _FLOATS


def _plain(*tensors) -> bool:
    """No tensor subclass among ``tensors`` (per call: under FSDP2 the
    parameters are plain inside forward; DTensors there, as in tensor
    parallelism, go to PEFT's forward)."""
    return all(t is None or type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


def _sharded_weight(w) -> bool:
    """A floating DTensor: FSDP2 keeps parameters sharded outside forward and
    registers the gathered, plain ones for the forward itself."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(w, DTensor) and w.dtype in _FLOATS


def _variant_name(layer, adapter: str) -> str:
    if layer.use_dora.get(adapter, False):
        return "DoRA (use_dora) around a base lora_kernels does not compute " \
               "(quantized, custom or hooked)" if _is_dora(layer, adapter) else "DoRA (use_dora)"
    return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}"


def _is_dora(layer, adapter: str) -> bool:
    """Whether ``adapter`` is PEFT's DoRA on a Linear (or Conv1D) layer."""
    from peft.tuners.lora import variants
    return type(layer.lora_variant.get(adapter)) is variants.DoraLinearVariant


def fused_variant(layer, kind: Optional[str], adapter: str) -> bool:
    """Whether ``adapter``, a PEFT LoRA variant, has a fused forward here:
    DoRA on a Linear whose base the ``dora_linear`` op computes (it needs W)."""
    return kind == "linear" and _is_dora(layer, adapter) and _gemm_base(layer.base_layer)


def _gemm_base(base: nn.Module) -> bool:
    """Whether the fused ``lora_linear`` op computes this base itself: a
    plain ``nn.Linear`` or GPT-2 ``Conv1D`` with a floating weight (a DTensor
    one under FSDP2). Any other base (bitsandbytes 4/8-bit, GPTQ, torchao,
    a custom module) runs as its own module and ``lora_delta`` adds the branch."""
    conv1d = _conv1d_cls()
    plain = type(base).forward is nn.Linear.forward or (
        conv1d is not None and isinstance(base, conv1d) and type(base).forward is conv1d.forward)
    weight = getattr(base, "weight", None)
    return plain and (_plain_weight(weight) or _sharded_weight(weight))


def _base_reason(kind: str, base: nn.Module) -> Optional[str]:
    """Why an embedding or conv base layer cannot be computed from its weight, or None."""
    name = type(base).__name__
    if kind == "embedding":
        if type(base).forward is not nn.Embedding.forward:
            return f"base layer {name} is not a plain nn.Embedding"
        opts = [o for o in ("max_norm", "scale_grad_by_freq", "sparse") if getattr(base, o)]
        if opts:
            return f"embedding option {', '.join(opts)} (the fused op has none)"
        if getattr(base, "embed_scale", None) is not None:
            return "embedding with embed_scale"
    else:
        if not isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or type(base).forward not in (
                nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
            return f"base layer {name} is not a plain nn.Conv1d/2d/3d"
        if base.groups != 1:
            return f"conv groups={base.groups} (PEFT's lora_A has groups=1)"
        if any(d != 1 for d in base.dilation):
            return f"conv dilation={base.dilation} (PEFT's lora_A has none)"
        if base.padding_mode != "zeros":
            return f"conv padding_mode={base.padding_mode!r} (PEFT's lora_A pads with zeros)"
    if not (_plain_weight(base.weight) or _sharded_weight(base.weight)):
        return (f"base weight is a {type(base.weight).__name__} of {base.weight.dtype} "
                "(quantized), not a floating tensor")
    if _has_hooks(base):
        return "base layer has forward hooks or a replaced forward (e.g. accelerate offloading)"
    return None


def _static_reason(layer, kind: Optional[str]) -> Optional[str]:
    """Why ``layer`` is never fused (reported by patch_peft), or None."""
    if kind is None:
        cls = type(layer)
        return f"layer type {cls.__module__}.{cls.__qualname__} is not one lora_kernels fuses"
    if "forward" in layer.__dict__:
        return "forward already replaced on this instance (e.g. by accelerate)"
    if "base_layer" not in layer._modules:
        return "no base_layer sub-module"
    why = _base_reason(kind, layer.base_layer) if kind in ("embedding", "conv") else None
    if why:
        return why
    if kind == "embedding" and (getattr(layer, "tp_layer", None) is not None
                                or getattr(layer, "input_fns", None)
                                or getattr(layer, "output_fns", None)):
        return "embedding with tensor parallelism (input_fns/output_fns)"
    adapters = list(_adapter_dict(layer, kind).keys())
    if adapters and all(a in layer.lora_variant and not fused_variant(layer, kind, a)
                        for a in adapters):
        return ", ".join(sorted({_variant_name(layer, a) for a in adapters}))
    return None


def _adapter_dict(layer, kind):
    return layer.lora_embedding_A if kind == "embedding" else layer.lora_A
