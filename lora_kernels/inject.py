"""Put LoRA layers into any model, without PEFT: ``inject(model, target_modules=[...])``.

Each targeted ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d`` or
transformers ``Conv1D`` is replaced by the lora_kernels layer of the same
shape (``Linear``, ``Linear(fan_in_fan_out=True)`` for ``Conv1D``,
``Embedding``, ``Conv1d/2d/3d``), built on the meta device and given the
original ``weight`` and ``bias`` Parameter objects: no copy of W is made, and
anything else holding W (a tied ``lm_head``, an optimizer) still sees it. Only
``lora_A``/``lora_B`` are allocated, on W's device and in W's dtype, and drawn
as loralib and PEFT draw them (A kaiming-uniform with a = √5 and B zero; for an
embedding A zero and B normal), so the model's outputs are unchanged. Then every
parameter but LoRA's is frozen (``mark_only_lora_as_trainable(model, bias)``),
and the parameters of ``modules_to_save`` are left trainable.

A bitsandbytes ``Linear4bit``/``Linear8bitLt`` (a model loaded with a
``BitsAndBytesConfig``: QLoRA) becomes a :class:`~lora_kernels.wrapped.WrappedLinear`
around it: the quantized layer runs as it is (its state-dict keys gain
``.base_layer``, as in PEFT), W is never dequantized into a kept copy, and
``lora_A``/``lora_B`` are float32. Those layers never merge: ``merge_weights``
defaults to loralib's True for the others, and asking for it explicitly on a
quantized target is an error (``WrappedLinear`` says why).

Targets are chosen as PEFT chooses them: a list of names, each matching a
module whose name is that name or ends with ``"." + name``; a string, matched
as a regular expression against the whole module name; or ``"all-linear"``
(every Linear and Conv1D but the output embedding). ``rank_pattern`` and
``alpha_pattern`` map regular expressions to a module's own r and lora_alpha
(PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``).

Every argument and every match is checked before the model is touched: on
any error no module is replaced and no ``requires_grad`` changes. Convolution
layers keep W as ``<name>.conv.weight`` (loralib's layout), so their keys in
``model.state_dict()`` move; the other layers keep their keys. Forward hooks
registered on a replaced module stay on the old module.
"""
from __future__ import annotations

import math
import numbers
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import distributed
from . import functional as LF
from .dora_layer import DoraLinear
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer
from .utils import _check_bias, mark_only_lora_as_trainable
from .wrapped import WrappedLinear, dense_numel

# What ``inject`` records on the model (``save_adapter`` reads it back).
CONFIG_ATTR = "_lora_kernels_inject_config"
ALL_LINEAR = "all-linear"

_CONV = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
SUPPORTED = ("nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, transformers Conv1D, "
             "bitsandbytes Linear4bit/Linear8bitLt")


def _hf_conv1d():
    # transformers is imported by any model that holds a Conv1D; never import it here.
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _bnb_linear(t: type) -> bool:
    # bitsandbytes is imported by any model that holds its layers; never import it here.
    bnb = sys.modules.get("bitsandbytes.nn")
    return bnb is not None and t in (getattr(bnb, "Linear4bit", None),
                                     getattr(bnb, "Linear8bitLt", None))


def layer_kind(module: nn.Module) -> Optional[str]:
    """'linear', 'conv1d_hf', 'embedding', 'conv' or 'quantized' (bitsandbytes
    4/8-bit) for a layer inject can wrap, else None.

    Exact types: a subclass may have its own forward, which the LoRA layer would drop.
    """
    t = type(module)
    if _bnb_linear(t):
        return "quantized"
    if t is nn.Linear:
        return "linear"
    if t is nn.Embedding:
        return "embedding"
    if t in _CONV:
        return "conv"
    if t is _hf_conv1d():
        return "conv1d_hf"
    return None


def is_lora_layer(module: nn.Module) -> bool:
    """A lora_kernels layer, or a loralib one (same layout)."""
    if isinstance(module, LoRALayer):
        return True
    loralib_layers = sys.modules.get("loralib.layers")
    return loralib_layers is not None and isinstance(module, loralib_layers.LoRALayer)


def matches(name: str, targets) -> bool:
    """PEFT's target rule: a regex string fully matches, or a list entry is the name's suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_key(keys, name: str) -> Optional[str]:
    """PEFT's rank_pattern/alpha_pattern rule: the first key matching the end of ``name``."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def candidate_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every named module but the root and what lives inside a LoRA layer (with duplicates)."""
    out, inside = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        out.append((name, module))
        if is_lora_layer(module):
            inside.append(name)
    return out


@dataclass
class InjectSummary:
    """What ``inject`` did: replaced layers (name → description), parameters counted."""

    layers: Dict[str, str] = field(default_factory=dict)
    modules_to_save: List[str] = field(default_factory=list)
    trainable_params: int = 0
    all_params: int = 0

    def __str__(self) -> str:
        lines = [f"{name}: {desc}" for name, desc in self.layers.items()]
        lines += [f"{name}: trainable (modules_to_save)" for name in self.modules_to_save]
        pct = 100.0 * self.trainable_params / max(self.all_params, 1)
        lines.append(f"trainable params: {self.trainable_params:,} || all params: "
                     f"{self.all_params:,} || trainable%: {pct:.4f}")
        return "\n".join(lines)


@dataclass
class _Plan:
    names: List[str]            # every name the module is reachable by
    module: nn.Module
    kind: str
    r: int
    alpha: float
    fan_in_fan_out: bool


def _fail(arg: str, got, expected: str):
    raise ValueError(f"{arg}: got {got!r}, expected {expected}")


def _check_names(arg: str, value, allow_regex: bool) -> None:
    if allow_regex and isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            _fail(arg, value, f"a valid regular expression ({e})")
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) \
            or not value or not all(isinstance(t, str) and t for t in value):
        _fail(arg, value, "a non-empty list of module names"
              + (" or a regular expression string" if allow_regex else ""))


def _check_pattern(arg: str, value, check_value) -> Dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(arg, value, "a dict mapping a regular expression to a value")
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            _fail(f"{arg} key", key, "a non-empty regular expression string")
        try:
            re.compile(key)
        except re.error as e:
            _fail(f"{arg} key", key, f"a valid regular expression ({e})")
        check_value(f"{arg}[{key!r}]", v)
    return dict(value)


def _check_rank(arg: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        _fail(arg, r, "a positive integer (PEFT rejects r <= 0)")


def _check_alpha(arg: str, alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) \
            or not math.isfinite(float(alpha)):
        _fail(arg, alpha, "a finite number")


def _examples(model: nn.Module, limit: int = 10) -> str:
    """A few names of the layers inject can wrap, to put in an error."""
    short, full = [], []
    for name, module in candidate_modules(model):
        if layer_kind(module) is not None:
            full.append(name)
            last = name.rsplit(".", 1)[-1]
            if last not in short:
                short.append(last)
    if not full:
        return "the model has no nn.Linear, nn.Embedding, nn.Conv or Conv1D layer"
    more = ", ..." if len(short) > limit else ""
    return (f"its layers are named e.g. {', '.join(map(repr, short[:limit]))}{more} "
            f"(full names like {full[0]!r})")


def _resolve_all_linear(model: nn.Module) -> List[str]:
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        try:
            out_emb = model.get_output_embeddings()
        except Exception:       # models without an LM head may raise
            out_emb = None
    return [name for name, m in candidate_modules(model)
            if layer_kind(m) in ("linear", "conv1d_hf", "quantized") and m is not out_emb]


def _plan(model, target_modules, r, lora_alpha, lora_dropout, fan_in_fan_out, bias,
          modules_to_save, rank_pattern, alpha_pattern, exclude_modules, merge_weights,
          use_dora=False):
    """Check everything and decide what to replace; changes nothing."""
    if not isinstance(model, nn.Module):
        _fail("model", type(model).__name__, "a torch.nn.Module")
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        targets = _resolve_all_linear(model)
        if not targets:
            _fail("target_modules", target_modules, f"a model with nn.Linear or Conv1D layers "
                  f"to target; {_examples(model)}")
        targets = [re.escape(t) for t in targets]
        targets = "(" + "|".join(targets) + ")"
    else:
        _check_names("target_modules", target_modules, allow_regex=True)
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    _check_rank("r", r)
    _check_alpha("lora_alpha", lora_alpha)
    LF.check_dropout(lora_dropout)
    if fan_in_fan_out not in (None, True, False):
        _fail("fan_in_fan_out", fan_in_fan_out, "None (from the layer type), True or False")
    _check_bias(bias)
    if merge_weights is not None and not isinstance(merge_weights, bool):
        _fail("merge_weights", merge_weights, "None (loralib's True where W can take ΔW), "
              "True or False")
    if not isinstance(use_dora, bool):
        _fail("use_dora", use_dora, "True or False")
    if modules_to_save is not None:
        _check_names("modules_to_save", modules_to_save, allow_regex=False)
        modules_to_save = list(modules_to_save)
    if exclude_modules is not None:
        _check_names("exclude_modules", exclude_modules, allow_regex=True)
    rank_pattern = _check_pattern("rank_pattern", rank_pattern, _check_rank)
    alpha_pattern = _check_pattern("alpha_pattern", alpha_pattern, _check_alpha)

    cands = candidate_modules(model)
    matched: Dict[int, _Plan] = {}
    unsupported, already, unmatched, unsupported_dora = [], [], [], []
    hit = set()
    for name, module in cands:
        if not matches(name, targets):
            continue
        if not isinstance(targets, str):
            hit.update(t for t in targets if name == t or name.endswith("." + t))
        if exclude_modules is not None and matches(name, exclude_modules):
            continue
        if id(module) in matched:
            matched[id(module)].names.append(name)
            continue
        kind = layer_kind(module)
        if is_lora_layer(module):
            already.append(name)
            continue
        if kind is None:
            unsupported.append(f"{name!r} ({type(module).__name__})")
            continue
        key = pattern_key(rank_pattern, name)
        rr = rank_pattern[key] if key is not None else r
        key = pattern_key(alpha_pattern, name)
        aa = alpha_pattern[key] if key is not None else lora_alpha
        fifo = kind == "conv1d_hf"
        if kind in ("linear", "conv1d_hf") and fan_in_fan_out is not None \
                and fan_in_fan_out != fifo:
            warnings.warn(f"fan_in_fan_out={fan_in_fan_out} does not fit {name!r} "
                          f"({type(module).__name__}); using fan_in_fan_out={fifo}, as PEFT does")
        if kind == "quantized" and merge_weights:
            _fail("merge_weights", merge_weights, f"None or False: {name!r} is a "
                  f"{type(module).__name__}, and merging ΔW into a quantized W would quantize "
                  "W + ΔW again, rounding most of a small ΔW away (PEFT does it with a warning; "
                  "lora_kernels runs the branch unmerged)")
        if use_dora and kind not in ("linear", "conv1d_hf"):
            unsupported_dora.append(f"{name!r} ({type(module).__name__})")
        matched[id(module)] = _Plan([name], module, kind, rr, aa, fifo)
    sharded = [p.names[0] for p in matched.values()
               if any(distributed.is_dtensor(t) for t in p.module.parameters())]
    if sharded:
        _fail("model", f"a model whose layers are sharded (DTensor weights in "
              f"{sharded[0]!r}, e.g. by fully_shard)", "an unsharded model: inject LoRA "
              "layers first, then shard (as with get_peft_model)")
    if already:
        _fail("target_modules", target_modules, "modules that are not LoRA layers already; "
              f"these are: {', '.join(map(repr, already[:5]))}")
    if unsupported:
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        _fail("target_modules", target_modules, f"names of layers of the supported types "
              f"({SUPPORTED}); it matches {', '.join(unsupported[:5])}{more}")
    if not matched:
        _fail("target_modules", target_modules, f"names that match modules of the model; "
              f"{_examples(model)}")
    if unsupported_dora:
        _fail("use_dora", use_dora, f"False for targets other than nn.Linear and transformers "
              f"Conv1D (DoRA layers are dense ones here); target_modules matches "
              f"{', '.join(unsupported_dora[:5])}")
    if not isinstance(targets, str):
        unmatched = [t for t in targets if t not in hit]
        if unmatched:
            warnings.warn(f"target_modules: {unmatched} match no module of the model")

    save_names: List[str] = []
    if modules_to_save:
        lora_names = {n for p in matched.values() for n in p.names}
        for target in modules_to_save:
            found = [n for n, _ in cands if n.endswith(target)]   # PEFT's rule for these
            if not found:
                _fail("modules_to_save", target, f"the name of a module of the model; "
                      f"{_examples(model)}")
            clash = [n for n in found if n in lora_names]
            if clash:
                _fail("modules_to_save", target, f"modules that are not also LoRA targets "
                      f"({clash[0]!r} is in target_modules)")
            save_names += [n for n in found if n not in save_names]
    return list(matched.values()), save_names, targets, modules_to_save


def _build(plan: _Plan, lora_dropout: float, merge_weights: Optional[bool],
           use_dora: bool = False) -> nn.Module:
    """The LoRA layer for ``plan.module``, holding its weight and bias Parameter objects
    (or, for a quantized layer, the layer itself)."""
    m, r, alpha = plan.module, plan.r, plan.alpha
    if plan.kind == "quantized":
        new = WrappedLinear(m, r=r, lora_alpha=alpha, lora_dropout=lora_dropout)
        nn.Module.train(new, m.training)
        return new
    merge_weights = True if merge_weights is None else merge_weights
    w = m.weight
    meta = dict(device="meta", dtype=w.dtype)    # allocates no W
    if plan.kind in ("linear", "conv1d_hf"):
        if plan.kind == "linear":
            in_f, out_f = m.in_features, m.out_features
        else:
            in_f, out_f = w.shape               # Conv1D keeps W as (in, out)
        new = (DoraLinear if use_dora else Linear)(
            in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
            fan_in_fan_out=plan.fan_in_fan_out, merge_weights=merge_weights,
            bias=m.bias is not None, **meta)
        owner = new
    elif plan.kind == "embedding":
        new = Embedding(m.num_embeddings, m.embedding_dim, r=r, lora_alpha=alpha,
                        merge_weights=merge_weights, padding_idx=m.padding_idx,
                        max_norm=m.max_norm, norm_type=m.norm_type,
                        scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse, **meta)
        owner = new
    else:
        new = _CONV[type(m)](m.in_channels, m.out_channels, m.kernel_size, r=r,
                             lora_alpha=alpha, lora_dropout=lora_dropout,
                             merge_weights=merge_weights, stride=m.stride, padding=m.padding,
                             dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                             padding_mode=m.padding_mode, **meta)
        owner = new.conv
    if tuple(owner.weight.shape) != tuple(w.shape):     # cannot happen for the exact types
        raise RuntimeError(f"{plan.names[0]}: weight {tuple(w.shape)} does not fit the LoRA "
                           f"layer's {tuple(owner.weight.shape)}")
    owner.weight = w
    if getattr(m, "bias", None) is not None:
        owner.bias = m.bias
    a = torch.empty(new.lora_A.shape, device=w.device, dtype=w.dtype)
    b = torch.empty(new.lora_B.shape, device=w.device, dtype=w.dtype)
    if plan.kind == "embedding":
        nn.init.zeros_(a)
        nn.init.normal_(b)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
    new.lora_A = nn.Parameter(a)
    new.lora_B = nn.Parameter(b)
    if use_dora:    # PEFT's start: m = ‖W + s·B·A‖ = ‖W‖ per row
        new.lora_magnitude_vector = nn.Parameter(new.weight_norm().to(w.dtype))
    nn.Module.train(new, m.training)     # the flag only: nothing to merge yet
    return new


def _describe(plan: _Plan, new: nn.Module) -> str:
    if plan.kind == "conv":
        shape = f"{type(new).__name__}({new.conv.in_channels}, {new.conv.out_channels}, " \
                f"kernel_size={new.conv.kernel_size})"
    elif plan.kind == "embedding":
        shape = f"Embedding({new.num_embeddings}, {new.embedding_dim})"
    elif plan.kind == "quantized":
        shape = f"WrappedLinear({type(plan.module).__name__}({new.in_features}, " \
                f"{new.out_features}))"
    else:
        shape = f"{type(new).__name__}({new.in_features}, {new.out_features}" \
                + (", fan_in_fan_out=True)" if plan.fan_in_fan_out else ")")
    return f"{shape}, r={plan.r}, lora_alpha={plan.alpha}"


def _inject(model, **kwargs):
    """inject, plus a function that puts the model back as it was (used by load_adapter)."""
    plans, save_names, targets, modules_to_save = _plan(model, **kwargs)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    old_config = model.__dict__.get(CONFIG_ATTR, None)
    done: List[Tuple[nn.Module, str, nn.Module]] = []

    def undo():
        for parent, attr, old in reversed(done):
            setattr(parent, attr, old)
        for p, flag in grads:
            p.requires_grad_(flag)
        if old_config is None:
            model.__dict__.pop(CONFIG_ATTR, None)
        else:
            model.__dict__[CONFIG_ATTR] = old_config

    summary = InjectSummary(modules_to_save=save_names)
    try:
        for plan in plans:
            new = _build(plan, kwargs["lora_dropout"], kwargs["merge_weights"],
                         kwargs.get("use_dora", False))
            for name in plan.names:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                done.append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, new)
            summary.layers[plan.names[0]] = _describe(plan, new)
        mark_only_lora_as_trainable(model, bias=kwargs["bias"])
        for name in save_names:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        merge_targets = old_config is not None
        model.__dict__[CONFIG_ATTR] = {
            # a second inject leaves the targets to be worked out from the layers
            "target_modules": None if merge_targets else targets,
            "bias": kwargs["bias"],
            "modules_to_save": sorted(set((old_config or {}).get("modules_to_save") or [])
                                      | set(modules_to_save or [])) or None,
        }
    except BaseException:
        undo()
        raise
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p
    summary.all_params = sum(dense_numel(p) for p in seen.values())
    summary.trainable_params = sum(dense_numel(p) for p in seen.values() if p.requires_grad)
    return summary, undo


def inject(model: nn.Module, target_modules: Union[Sequence[str], str], r: int = 8,
           lora_alpha: float = 16, lora_dropout: float = 0.0,
           fan_in_fan_out: Optional[bool] = None, bias: str = "none",
           modules_to_save: Optional[Sequence[str]] = None,
           rank_pattern: Optional[Dict[str, int]] = None,
           alpha_pattern: Optional[Dict[str, float]] = None,
           exclude_modules: Optional[Union[Sequence[str], str]] = None,
           merge_weights: Optional[bool] = None,
           use_dora: bool = False) -> Tuple[nn.Module, InjectSummary]:
    """Replace the layers named by ``target_modules`` with LoRA layers, in place.

    Arguments and defaults are PEFT ``LoraConfig``'s (``fan_in_fan_out=None``
    takes it from the layer type: True for transformers ``Conv1D``, False for
    ``nn.Linear``; a value that does not fit the layer is corrected with a
    warning, as PEFT does). ``merge_weights`` is loralib's (``model.eval()``
    merges ΔW into W in place, ``model.train()`` takes it out again); None
    means True for float weights and False for quantized ones (bitsandbytes),
    which are never merged (True with a quantized target raises).
    ``use_dora`` is PEFT's: the Linear and Conv1D targets become
    :class:`~lora_kernels.dora_layer.DoraLinear` layers (other target types
    are refused with use_dora).

    Returns ``(model, summary)``; ``print(summary)`` lists the replaced layers
    and the trainable parameter count. Raises ``ValueError`` naming the
    argument, before anything changes, when an argument is invalid, when
    ``target_modules`` matches no module (the message lists some layer names
    of the model), matches a module of an unsupported type or one that is
    already a LoRA layer, or when a ``modules_to_save`` entry matches nothing.
    """
    summary, _ = _inject(model, target_modules=target_modules, r=r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, fan_in_fan_out=fan_in_fan_out, bias=bias,
                         modules_to_save=modules_to_save, rank_pattern=rank_pattern,
                         alpha_pattern=alpha_pattern, exclude_modules=exclude_modules,
                         merge_weights=merge_weights, use_dora=use_dora)
    return model, summary
