"""Run an existing Hugging Face PEFT model's LoRA layers on the fused ops.

    report = patch_peft(model)     # model: a peft.PeftModel (or a module holding PEFT LoRA layers)
    ...train, evaluate, save_pretrained...
    unpatch_peft(model)            # PEFT's own forward again

``patch_peft`` gives every PEFT LoRA layer it can fuse (``peft.tuners.lora``
Linear, Embedding, Conv1d/2d/3d and AdaLoRA's ``SVDLinear``) a new ``forward``
on the existing instance; modules, parameters, their names and optimizer
state are untouched, so ``save_pretrained``/``from_pretrained``,
``set_adapter``, ``merge_adapter``/``unmerge_adapter``/``merge_and_unload``,
``disable_adapter()`` and AdaLoRA's ``update_and_allocate`` work as before.
``unpatch_peft`` deletes that attribute, so the layer's ``forward`` is PEFT's
method again. Patching twice is a no-op (it also picks up layers that became
fusable since); unpatching a model with no patched layer is a no-op.

What runs where, per call (``_FusedForward.__call__``):

* Linear (``nn.Linear`` or GPT-2's ``Conv1D`` base, ``fan_in_fan_out``) and
  SVDLinear: one ``lora_linear`` op computes the frozen GEMM and the first
  adapter's update (its dropout mask regenerated from a seed). With dropout
  off (eval, or p = 0) every active adapter is folded into that one call by
  stacking them along the rank: A = [A₁; A₂; …], B = [s₁B₁, s₂B₂, …],
  scaling 1. With dropout on, each further adapter keeps its own mask (as in
  PEFT) and runs as ``dropout(x)·Aᵀ·Bᵀ·s`` with the lora_kernels dropout op.
  ``lora_bias`` is folded into the base bias (b + s·b_B). AdaLoRA passes
  A⊙(E·scaling/(ranknum + 1e-5)) as A with scaling 1: an r×in product whose
  autograd gives lora_A, lora_E and lora_B their real gradients.
* Embedding: one ``lora_embedding`` op; several adapters are folded as above
  (PEFT applies no dropout to embeddings).
* Conv: one convolution with W + Σ sₖBₖAₖ from the ``merged_weight`` op when
  dropout is off and the weight is fp32/fp64 without autocast (in fp16/bf16
  the merged weight would round a small ΔW away); otherwise PEFT's forward.

Dtypes. PEFT casts x to the adapter dtype for the LoRA branch (with
``autocast_adapter_dtype`` the adapters of a bf16 model are fp32, so that is
an fp32 copy of x, kept for backward) and returns the base layer's dtype.
The fused op needs one dtype; we cast the adapter weights (r×in and out×r,
differentiably, so the fp32 parameters get their gradients) to the base
weight's dtype instead and never copy x. The base GEMM and its output are
exactly PEFT's dtype; the low-rank branch is computed as under
``torch.autocast`` to that dtype (fp32 accumulation, s = x·Aᵀ kept in fp32).
When x's dtype differs from the weight's outside autocast, PEFT runs.

FSDP2. ``fully_shard`` keeps parameters as DTensors outside forward and
registers the gathered, plain ones for the forward, so a layer is patched
whether ``patch_peft`` runs before or after ``fully_shard`` (also on layers
FSDP2 wrapped one by one), and its fused forward sees plain tensors.

Left to PEFT's own forward, per call: ``adapter_names=`` (mixed batches) or
any other extra argument, merged layers, disabled adapters, no active adapter
in the layer (PEFT then runs the base layer alone), an active adapter that is
a LoRA variant (DoRA, aLoRA, …), AdaLoRA adapters of rank 0, base layers or
LoRA sub-modules with forward hooks, a dropout module that is not
``nn.Dropout``/``nn.Identity``, DTensor parameters inside forward (tensor
parallelism). Never patched (reported by ``patch_peft``): layer types other
than the ones above (quantized bnb/GPTQ/…, MultiheadAttention, ParamWrapper,
other tuners), a base layer that is not a plain ``nn.Linear``/``Conv1D``/
``nn.Embedding``/``nn.ConvNd`` with a floating weight (quantized), layers
whose every adapter is a variant, convs with
groups, dilation or non-zero padding modes, embeddings with ``max_norm``,
``sparse``, ``scale_grad_by_freq``, an ``embed_scale`` or tensor parallelism.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module

from . import functional as LF

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


def _kind(layer) -> Optional[str]:
    lora, adalora = _peft()
    cls = _layer_class(layer)
    if cls is lora.Linear:
        return "linear"
    if cls is adalora.SVDLinear:
        return "svd"
    if cls is lora.Embedding:
        return "embedding"
    if cls in (lora.Conv1d, lora.Conv2d, lora.Conv3d):
        return "conv"
    return None


# ---------------------------------------------------------------------------
# Eligibility
# ---------------------------------------------------------------------------

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
        return "DoRA (use_dora)"
    return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}"


def _base_reason(kind: str, base: nn.Module) -> Optional[str]:
    """Why this base layer cannot be computed from its weight, or None."""
    name = type(base).__name__
    if kind in ("linear", "svd"):
        conv1d = _conv1d_cls()
        plain = type(base).forward is nn.Linear.forward or (
            conv1d is not None and isinstance(base, conv1d)
            and type(base).forward is conv1d.forward)
        if not plain:
            return f"base layer {name} is not a plain nn.Linear or Conv1D (quantized or custom)"
    elif kind == "embedding":
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
    why = _base_reason(kind, layer.base_layer)
    if why:
        return why
    if kind == "embedding" and (getattr(layer, "tp_layer", None) is not None
                                or getattr(layer, "input_fns", None)
                                or getattr(layer, "output_fns", None)):
        return "embedding with tensor parallelism (input_fns/output_fns)"
    adapters = list(_adapter_dict(layer, kind).keys())
    if adapters and all(a in layer.lora_variant for a in adapters):
        return ", ".join(sorted({_variant_name(layer, a) for a in adapters}))
    return None


def _adapter_dict(layer, kind):
    return layer.lora_embedding_A if kind == "embedding" else layer.lora_A


# ---------------------------------------------------------------------------
# The fused forwards. Each returns None to let PEFT's forward run instead.
# ---------------------------------------------------------------------------

def _autocast_on(x: torch.Tensor) -> bool:
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _dropout_p(module) -> Optional[float]:
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout and not _has_hooks(module):
        p = float(module.p) if module.training else 0.0
        return p if p < 1.0 else None
    return None


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and not _has_hooks(m)


def _active(layer, kind):
    """The active adapters of this layer, or None when PEFT must run."""
    if layer.disable_adapters or layer.merged:
        return None
    present = _adapter_dict(layer, kind)
    active = [a for a in layer.active_adapters if a in present]
    if not active or any(a in layer.lora_variant for a in active):
        return None
    return active


def _linear_terms(layer, kind, active, dtype, cast):
    """(A, B, scaling, dropout p, lora_B bias) per active adapter, A and B in
    ``dtype`` when ``cast``; None when an adapter cannot be fused."""
    terms = []
    for a in active:
        p = _dropout_p(layer.lora_dropout[a])
        if p is None:
            return None
        if kind == "svd":
            A, E, B = layer.lora_A[a], layer.lora_E[a], layer.lora_B[a]
            if A.shape[0] == 0 or not _plain(A, E, B):
                return None
            adapter_dtype = A.dtype
            # PEFT: (x·(A⊙E)ᵀ·Bᵀ)·scaling/(ranknum + 1e-5); the scale goes into
            # the r×1 E so the op runs with scaling 1 and nothing syncs.
            A = A * (E * (layer.scaling[a] / (layer.ranknum[a] + 1e-5)))
            s, bias = 1.0, None
        else:
            mA, mB = layer.lora_A[a], layer.lora_B[a]
            if not (_plain_linear(mA) and _plain_linear(mB) and _plain(mA.weight, mB.weight)):
                return None
            A, B, s, bias = mA.weight, mB.weight, layer.scaling[a], mB.bias
            adapter_dtype = A.dtype
        if adapter_dtype != dtype and not layer.cast_input_dtype_enabled:
            return None  # PEFT would feed x uncast to the adapter
        if cast:
            A, B = A.to(dtype), B.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        terms.append((A, B, s, p, bias))
    return terms


def _fold(terms):
    """One (A, B, scaling) for the sum of several adapters: stack along the rank."""
    if len(terms) == 1:
        A, B, s = terms[0][:3]
        return A, B, s
    A = torch.cat([t[0] for t in terms], dim=0)
    B = torch.cat([t[1] * t[2] for t in terms], dim=1)
    return A, B, 1.0


def _bias(base_bias, terms):
    bias = base_bias
    for _, _, s, _, b in terms:
        if b is not None:
            bias = b * s if bias is None else bias + b * s
    return bias


def _linear_forward(layer, kind, x):
    active = _active(layer, kind)
    if active is None:
        return None
    base = layer.base_layer
    weight = base.weight
    autocast = _autocast_on(x)
    if (not autocast and x.dtype != weight.dtype) or not _plain(weight, base.bias):
        return None
    terms = _linear_terms(layer, kind, active, weight.dtype, cast=not autocast)
    if terms is None:
        return None
    fan_in_fan_out = type(base).forward is not nn.Linear.forward  # transformers Conv1D
    bias = _bias(base.bias, terms)
    dropping = [t for t in terms if t[3] > 0.0]
    if not dropping:
        A, B, s = _fold(terms)
        return LF.lora_linear(x, weight, bias, A, B, s, 0.0, False, fan_in_fan_out)
    # Dropout on: one mask per adapter, as in PEFT. The first adapter rides
    # the fused GEMM; the others use the lora_kernels dropout op.
    A, B, s, p, _ = terms[0]
    y = LF.lora_linear(x, weight, bias, A, B, s, p, True, fan_in_fan_out)
    for A, B, s, p, _ in terms[1:]:
        y = y + F.linear(F.linear(LF.dropout(x, p), A), B) * s
    return y


def _embedding_forward(layer, x):
    active = _active(layer, "embedding")
    if active is None or x.dtype not in (torch.int64, torch.int32):
        return None
    base = layer.base_layer
    weight = base.weight
    if not _plain(weight):
        return None
    terms = []
    for a in active:
        if layer.input_fns.get(a) is not None or layer.output_fns.get(a) is not None:
            return None
        A, B = layer.lora_embedding_A[a], layer.lora_embedding_B[a]
        if not _plain(A, B):
            return None
        terms.append((A.to(weight.dtype), B.to(weight.dtype), layer.scaling[a], 0.0, None))
    A, B, s = _fold(terms)
    return LF.lora_embedding(x, weight, A, B, s, base.padding_idx)


def _conv_forward(layer, x):
    active = _active(layer, "conv")
    if active is None:
        return None
    base = layer.base_layer
    weight = base.weight
    # Merging ΔW into a half-precision W would round a small ΔW away.
    if _autocast_on(x) or weight.dtype not in (torch.float32, torch.float64) \
            or x.dtype != weight.dtype or not _plain(weight, base.bias):
        return None
    terms = []
    for a in active:
        p = _dropout_p(layer.lora_dropout[a])
        mA, mB = layer.lora_A[a], layer.lora_B[a]
        if p != 0.0 or type(mA) is not type(base) or type(mB) is not type(base) \
                or _has_hooks(mA) or _has_hooks(mB) or not _plain(mA.weight, mB.weight):
            return None  # dropout on the branch input: PEFT's low-rank chain
        r = mA.weight.shape[0]
        if mA.weight.shape[1:] != weight.shape[1:] or mB.weight.shape[:2] != (weight.shape[0], r) \
                or mA.stride != base.stride or mA.padding != base.padding:
            return None
        A, B = mA.weight.reshape(r, -1), mB.weight.reshape(weight.shape[0], r)
        terms.append((A.to(weight.dtype), B.to(weight.dtype), layer.scaling[a], 0.0, mB.bias))
    A, B, s = _fold(terms)
    w = LF.merged_weight(weight, A, B, s)
    return base._conv_forward(x, w, _bias(base.bias, terms))


class _FusedForward:
    """The ``forward`` patch_peft sets on a layer instance: the fused path,
    or the layer's own (PEFT's) forward where that cannot fuse. A plain
    object (not a bound method) so a patched model pickles and deep-copies."""

    def __init__(self, layer: nn.Module, kind: str):
        self.__self__ = layer
        self.kind = kind
        self.base = layer.base_layer

    def __call__(self, x, *args, **kwargs):
        layer = self.__self__
        out = None
        if not args and not kwargs and isinstance(x, torch.Tensor) \
                and layer.base_layer is self.base and not _has_hooks(self.base) \
                and not _global_hooks():
            if self.kind == "embedding":
                out = _embedding_forward(layer, x)
            elif self.kind == "conv":
                out = _conv_forward(layer, x)
            else:
                out = _linear_forward(layer, self.kind, x)
        if out is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        return out

    def __repr__(self):
        return f"<lora_kernels fused forward of {type(self.__self__).__name__}>"


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------

@dataclass
class PatchReport:
    """What ``patch_peft`` did: the layers running fused and those left to
    PEFT, each with its reason (layer names as in ``model.named_modules()``)."""

    patched: List[str] = field(default_factory=list)
    deferred: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"patched": len(self.patched), "deferred": dict(self.deferred)}

    def __str__(self) -> str:
        total = len(self.patched) + len(self.deferred)
        head = f"lora_kernels.patch_peft: {len(self.patched)} of {total} LoRA layers fused"
        if not self.deferred:
            return head
        by_reason: Dict[str, List[str]] = {}
        for name, why in self.deferred.items():
            by_reason.setdefault(why, []).append(name)
        lines = [head + f"; {len(self.deferred)} left to PEFT:"]
        for why, names in by_reason.items():
            more = f", … ({len(names) - 3} more)" if len(names) > 3 else ""
            shown = ", ".join(names[:3]) + more
            lines.append(f"  {len(names):4d} × {why}: {shown}")
        return "\n".join(lines)


def _lora_layers(model, fn: str):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: got {type(model).__name__}, expected a PEFT model "
                         "(an nn.Module such as peft.PeftModel)")
    lora, _ = _peft()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lora.LoraLayer)]
    if not layers and fn == "patch_peft":
        raise ValueError(f"model: got a {type(model).__name__} with no PEFT LoRA layers, "
                         "expected a PEFT model (peft.PeftModel, or a module holding "
                         "peft.tuners.lora / adalora layers)")
    return layers


def patch_peft(model: nn.Module, verbose: bool = True) -> PatchReport:
    """Run ``model``'s PEFT LoRA layers on the fused lora_kernels ops.

    Sets a new ``forward`` on each layer instance that can be fused (nothing
    else changes: modules, parameters, names, optimizer state), prints one
    summary (``verbose``) and returns it as a :class:`PatchReport`. Layers
    already patched stay patched; calling it again after ``add_adapter`` or
    other changes patches the layers that have become fusable.
    Raises ``ValueError`` when ``model`` holds no PEFT LoRA layer.
    """
    report = PatchReport()
    for name, layer in _lora_layers(model, "patch_peft"):
        if isinstance(layer.__dict__.get("forward"), _FusedForward):
            report.patched.append(name)
            continue
        kind = _kind(layer)
        why = _static_reason(layer, kind)
        if why:
            report.deferred[name] = why
            continue
        layer.forward = _FusedForward(layer, kind)
        report.patched.append(name)
    if verbose:
        print(report)
    return report


def unpatch_peft(model: nn.Module) -> int:
    """Give every patched layer of ``model`` PEFT's forward back (the class
    method, as before ``patch_peft``). Returns how many layers were restored;
    a model with none patched is left as it is (returns 0)."""
    restored = 0
    for _, layer in _lora_layers(model, "unpatch_peft"):
        if isinstance(layer.__dict__.get("forward"), _FusedForward):
            del layer.forward
            restored += 1
    return restored


def is_patched(layer: nn.Module) -> bool:
    """Whether ``layer`` runs on lora_kernels' fused forward."""
    return isinstance(layer.__dict__.get("forward"), _FusedForward)
