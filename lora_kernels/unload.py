"""Merge every LoRA update into its weight and drop the adapters, for deployment.

``merge_and_unload(model)`` is PEFT's ``merge_and_unload`` for models built with
lora_kernels layers (loralib-style ``lora.Linear(...)`` or ``lora_kernels.inject``):
each LoRA layer is replaced, in its parent, by the plain torch module holding
W + ΔW, and the model is returned. What is left is an ordinary PyTorch model:
no ``lora_*`` parameters, no lora_kernels op in its forward, state-dict keys of
the base model (a convolution's W moves back from ``<name>.conv.weight`` to
``<name>.weight``), ready for ``torch.save``, ``torch.export``, ONNX or a
serving stack that knows nothing of LoRA, at the speed of the base model.

* ``Linear``, ``MergedLinear`` and any other LoRALayer subclass of ``nn.Linear``
  (e.g. AdaLoRA's ``SVDLinear``) → ``nn.Linear``; with ``fan_in_fan_out=True``
  (W stored (in, out)) its weight is the (out, in) transposed view of that storage;
* ``Embedding`` → ``nn.Embedding`` with the same padding_idx, max_norm, norm_type,
  scale_grad_by_freq and sparse;
* ``Conv1d``, ``Conv2d``, ``Conv3d`` → the layer's own ``conv`` module;
* ``WrappedLinear`` with r=0 → its ``base_layer``.

ΔW goes in through the layer's own merge (``_apply_delta(+1)``), so a subclass
with its own update (e.g. DoRA's W ← m·(W + s·B·A)) is merged as it merges
itself; a layer already merged (eval mode with ``merge_weights=True``) is not
merged again, and a layer without an update (r=0, a ``MergedLinear`` with no
enabled group) just becomes the plain module. The plain module is built
without allocating a weight and takes the layer's W storage (for a
non-transposed weight, the same ``Parameter`` object) and its bias
``Parameter``: no copy of W is made. Each plain module keeps the layer's
device, dtype and train/eval flag, and W keeps the ``requires_grad`` it had in
the LoRA layer (False after ``inject`` or a LoRA constructor, which freeze
it): call ``requires_grad_(True)`` to fine-tune the merged model further.

Refused, with nothing in the model changed: a ``WrappedLinear`` with an update
(LoRA around a bitsandbytes 4-bit/8-bit base: W + ΔW would have to be
quantized again, which rounds most of a small ΔW away; PEFT merges and rounds
it, lora_kernels keeps such adapters unmerged), a loralib or PEFT LoRA layer,
a LoRALayer subclass with no known plain counterpart, and layers whose weights
are sharded (DTensor) or on the meta device. The old layer objects share W with
the plain modules: they are left merged, with ``merge_weights=False`` so that
their ``train()`` never takes ΔW out of the shared W again. Forward hooks
registered on a LoRA layer stay on it, and are not carried to the plain module.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn

from . import distributed
from .inject import CONFIG_ATTR, is_lora_layer
from .layers import ConvLoRA, LoRALayer
from .wrapped import WrappedLinear

__all__ = ["merge_and_unload"]

# A child or parameter by one of these names marks a LoRA layer from another library
# (PEFT's layers hold lora_A/lora_B as ModuleDicts, its embeddings lora_embedding_A/B).
_FOREIGN_LORA_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
# bitsandbytes' quantized linear layers and weight classes (never imported here).
_QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


def _label(name: str) -> str:
    return repr(name) if name else "the model itself"


def _is_quantized(base: nn.Module) -> bool:
    if type(base).__name__ in _QUANTIZED_LAYERS:
        return True
    return any(type(p).__name__ in _QUANTIZED_PARAMS for p in base.parameters())


def _looks_like_lora(module: nn.Module) -> bool:
    """A LoRA layer of any library: ours, loralib's, or one holding lora_A/lora_B itself."""
    if is_lora_layer(module):
        return True
    return any(n in module._parameters or n in module._modules for n in _FOREIGN_LORA_NAMES)


def _has_update(layer: LoRALayer) -> bool:
    return bool(layer._has_lora())


def _refusal(name: str, module: nn.Module) -> Optional[str]:
    """Why ``module`` (found at ``name``) cannot be unloaded, or None if it can."""
    label, kind = _label(name), type(module).__name__
    if isinstance(module, WrappedLinear):
        if not _has_update(module):
            return None
        base = type(module.base_layer).__name__
        if _is_quantized(module.base_layer):
            return (f"{label} is a WrappedLinear around a quantized {base}, expected a layer "
                    "whose W can take ΔW: merging would quantize W + ΔW again and round "
                    "most of a small ΔW away (PEFT merges and rounds it); keep the adapter "
                    "(run the model unmerged), or dequantize the base to a float nn.Linear "
                    "first")
        return (f"{label} is a WrappedLinear around a {base}, expected a layer whose W "
                "lora_kernels can merge into: the base runs as its own module and is never "
                "merged into; keep the adapter, or inject into the float nn.Linear directly")
    if not isinstance(module, LoRALayer):
        lib = type(module).__module__.split(".")[0]
        hint = {"peft": "use PEFT's own PeftModel.merge_and_unload()",
                "loralib": "build the model with lora_kernels' layers (same names and "
                           "checkpoints) and unload that"}.get(lib, "merge it with the library "
                                                              "that defines it")
        return (f"{label} is a {type(module).__module__}.{kind}, expected a lora_kernels "
                f"LoRA layer: it holds LoRA tensors this function does not know how to "
                f"merge; {hint}")
    if isinstance(module, ConvLoRA):
        if not isinstance(getattr(module, "conv", None), nn.modules.conv._ConvNd):
            return (f"{label} is a {kind} whose 'conv' is a "
                    f"{type(getattr(module, 'conv', None)).__name__}, expected an "
                    "nn.Conv1d/2d/3d")
    elif not isinstance(module, (nn.Linear, nn.Embedding)):
        return (f"{label} is a {kind}, a LoRALayer with no known plain counterpart, expected "
                "a subclass of nn.Linear, nn.Embedding or ConvLoRA")
    tensors = list(module.parameters()) + list(module.buffers())
    if any(distributed.is_dtensor(t) for t in tensors):
        return (f"{label} is a {kind} with sharded (DTensor) weights, expected an unsharded "
                "layer: gather the full state dict into an unsharded model first")
    if any(t.is_meta for t in tensors):
        return (f"{label} is a {kind} with weights on the meta device, expected materialized "
                "weights: to_empty() and load the checkpoint first")
    return None


def _find(model: nn.Module) -> List[Tuple[nn.Module, List[str]]]:
    """Every LoRA-looking module (outermost only), once, with all the names it is reachable by."""
    found, by_id, inside = [], {}, []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(p == "" or name.startswith(p + ".") for p in inside):
            continue
        if not _looks_like_lora(module):
            continue
        inside.append(name)
        if id(module) in by_id:
            by_id[id(module)][1].append(name)
        else:
            by_id[id(module)] = (module, [name])
            found.append(by_id[id(module)])
    return found


def _plain(layer: LoRALayer) -> nn.Module:
    """The plain module holding ``layer``'s (merged) W storage and bias Parameter."""
    if isinstance(layer, WrappedLinear):
        plain = layer.base_layer
    elif isinstance(layer, ConvLoRA):
        plain = layer.conv
    elif isinstance(layer, nn.Embedding):
        w = layer.weight
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim,
                             padding_idx=layer.padding_idx, max_norm=layer.max_norm,
                             norm_type=layer.norm_type,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse,
                             device="meta", dtype=w.dtype)
        plain.weight = w
    else:
        w = layer.weight
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta", dtype=w.dtype)
        if getattr(layer, "fan_in_fan_out", False):
            # W is stored (in, out): nn.Linear takes the (out, in) view of that storage.
            w = nn.Parameter(w.detach().transpose(0, 1), requires_grad=w.requires_grad)
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise RuntimeError(f"{type(layer).__name__}: weight {tuple(w.shape)} does not fit "
                               f"({layer.out_features}, {layer.in_features})")
        plain.weight = w
        if layer.bias is not None:
            plain.bias = layer.bias
    plain.train(layer.training)
    return plain


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge each LoRA layer's ΔW into its W and replace the layer, in place in its
    parent, by the plain torch module (``nn.Linear``, ``nn.Embedding``, the
    conv) holding W + ΔW in the same storage; return the model.

    ``model`` may itself be a LoRA layer (its plain module is returned) or hold
    no LoRA layer (returned unchanged). Layers not yet merged are merged through
    their own ``_apply_delta(+1)``; layers already merged are not merged again.
    W keeps its ``requires_grad`` (frozen after ``inject``), device, dtype and
    the layer's train/eval flag. ``inject``'s record on a module is removed.

    Raises ``ValueError`` naming every offending layer, before anything in the
    model changes, for a ``WrappedLinear`` with an update (a quantized base:
    W + ΔW cannot be merged without rounding ΔW away), a LoRA layer of another
    library (loralib, PEFT), a LoRALayer subclass with no known plain module,
    or sharded/meta-device weights. See the module docstring.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
    found = _find(model)
    problems = [p for p in (_refusal(names[0], m) for m, names in found) if p is not None]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError("model: cannot merge and unload, nothing was changed: "
                         + "; ".join(problems[:5]) + more)

    merged: List[LoRALayer] = []
    try:
        for layer, _ in found:
            if not layer.merged and _has_update(layer):
                layer._apply_delta(+1)
                layer.merged = True
                merged.append(layer)
        plains = [_plain(layer) for layer, _ in found]
    except BaseException:
        for layer in reversed(merged):      # take ΔW out again: the model is as it was
            layer._apply_delta(-1)
            layer.merged = False
        raise

    for layer, _ in found:
        if getattr(layer, "merged", False):
            layer.merge_weights = False     # W is shared with the plain module now
    root = model
    for (_, names), plain in zip(found, plains):
        for name in names:
            if not name:
                root = plain
                continue
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, plain)
    for module in root.modules():
        module.__dict__.pop(CONFIG_ATTR, None)
    return root
