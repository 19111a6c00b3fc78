"""The fused forwards ``patch_peft`` gives PEFT LoRA layers (see ``peft_patch``'s
docstring for what runs where). Each ``_*_forward`` returns None to let PEFT's
own forward run instead; ``_FusedForward`` is the object set on the instance.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as LF
from .peft_layers import (_adapter_dict, _gemm_base, _global_hooks, _has_hooks, _plain,
                          fused_variant)

_NO_CONTEXT = contextlib.nullcontext()


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


def _active(layer, kind, variants: bool = False):
    """The active adapters of this layer, or None when PEFT must run
    (LoRA variants: DoRA alone, with ``variants``, see ``_dora_forward``)."""
    if layer.disable_adapters or layer.merged:
        return None
    present = _adapter_dict(layer, kind)
    active = [a for a in layer.active_adapters if a in present]
    if not active:
        return None
    if any(a in layer.lora_variant for a in active):
        ok = variants and len(active) == 1 and fused_variant(layer, kind, active[0])
        return active if ok else None
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
    active = _active(layer, kind, variants=True)
    if active is None:
        return None
    if active[0] in layer.lora_variant:
        return _dora_forward(layer, x, active[0])
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


def _dora_forward(layer, x, adapter):
    """PEFT's DoRA (``DoraLinearVariant``) on the ``dora_linear`` op, for one
    active adapter on a plain Linear/Conv1D base: the row norms of W + s·B·A
    without the out×in sum (‖W_i‖² cached), the dropout mask regenerated,
    one frozen GEMM with dropout off. Adapters in W's dtype, as the LoRA path."""
    base = layer.base_layer
    weight = base.weight
    autocast = _autocast_on(x)
    if (not autocast and x.dtype != weight.dtype) or not _plain(weight, base.bias):
        return None
    terms = _linear_terms(layer, "linear", [adapter], weight.dtype, cast=not autocast)
    dora = layer.lora_magnitude_vector[adapter]
    if terms is None or _has_hooks(dora) or not _plain(dora.weight):
        return None
    A, B, s, p, lora_bias = terms[0]
    magnitude = dora.weight if autocast else dora.weight.to(weight.dtype)
    fan_in_fan_out = type(base).forward is not nn.Linear.forward  # transformers Conv1D
    return LF.dora_linear(x, weight, base.bias, A, B, magnitude, s, p, True, fan_in_fan_out,
                          lora_bias=lora_bias)


def _around_forward(layer, kind, x):
    """The base layer runs as its own module (quantized, custom or hooked:
    PEFT calls it the same way) and ``lora_delta`` adds the branch to its
    output, in x's dtype: the adapters are cast to it, x never is, and under
    autocast the branch runs in x's dtype too (autocast off for the op). Holds
    for backward what ``lora_linear``'s branch does: x, s = dropout(x)·Aᵀ and
    the seed, no dropped copy of x and no mask. Returns None (PEFT runs) only
    before the base has run."""
    active = _active(layer, kind)
    if active is None or not x.is_floating_point() or not _plain(x):
        return None
    terms = _linear_terms(layer, kind, active, x.dtype, cast=True)
    if terms is None:
        return None
    result = layer.base_layer(x)
    if not (isinstance(result, torch.Tensor) and _plain(result) and result.dtype == x.dtype
            and result.shape[:-1] == x.shape[:-1]):
        return _unfused_branch(layer, kind, active, x, result)
    with torch.autocast(x.device.type, enabled=False) if _autocast_on(x) else _NO_CONTEXT:
        if all(t[3] == 0.0 for t in terms):
            A, B, s = _fold(terms)
            y = LF.lora_delta(x, result, A, B, s, 0.0, False)
        else:  # one mask per adapter, as in PEFT
            y = result
            for A, B, s, p, _ in terms:
                y = LF.lora_delta(x, y, A, B, s, p, True)
    bias = _bias(None, terms)  # lora_bias: s·b_B
    return y if bias is None else y + bias


def _unfused_branch(layer, kind, active, x, result):
    """PEFT's own branch, for a base output the op cannot take (a dtype other
    than x's, a tensor subclass): the base has run already, so its output is
    not computed twice."""
    autocast = _autocast_on(x)
    for a in active:
        dropout = layer.lora_dropout[a]
        if kind == "svd":
            A, E, B = layer.lora_A[a], layer.lora_E[a], layer.lora_B[a]
            xa = x if autocast else layer._cast_input_dtype(x, A.dtype)
            out = dropout(xa) @ (A * E).T @ B.T * (layer.scaling[a] / (layer.ranknum[a] + 1e-5))
        else:
            xa = x if autocast else layer._cast_input_dtype(x, layer.lora_A[a].weight.dtype)
            out = layer.lora_B[a](layer.lora_A[a](dropout(xa))) * layer.scaling[a]
        result = result + out.to(result.dtype)
    return result


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
        # Linear kinds: the op computes the base GEMM (a plain base without
        # hooks) or the base runs as its own module around which lora_delta
        # adds the branch.
        self.gemm = kind in ("linear", "svd") and _gemm_base(self.base)

    def __call__(self, x, *args, **kwargs):
        layer = self.__self__
        out = None
        if not args and not kwargs and isinstance(x, torch.Tensor) \
                and layer.base_layer is self.base and not _global_hooks():
            hooked = _has_hooks(self.base)
            if self.kind == "embedding":
                out = None if hooked else _embedding_forward(layer, x)
            elif self.kind == "conv":
                out = None if hooked else _conv_forward(layer, x)
            elif self.gemm and not hooked:
                out = _linear_forward(layer, self.kind, x)
            else:
                out = _around_forward(layer, self.kind, x)
        if out is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        return out

    def __repr__(self):
        return f"<lora_kernels fused forward of {type(self.__self__).__name__}>"
