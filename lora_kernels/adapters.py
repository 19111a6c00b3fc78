"""LoRA adapters in PEFT's on-disk format: ``save_adapter`` and ``load_adapter``.

A directory holds ``adapter_config.json`` (the dict ``peft.LoraConfig.to_dict()``
gives in PEFT 0.21.2, as ``PeftModel.save_pretrained`` writes it) and
``adapter_model.safetensors`` with PEFT's keys, no adapter name in them:

    base_model.model.<module>.lora_A.weight        (r_p, in)      Linear, Conv1D
    base_model.model.<module>.lora_B.weight        (out, r_p)
    base_model.model.<module>.lora_embedding_A     (r_p, num)     Embedding
    base_model.model.<module>.lora_embedding_B     (dim, r_p)
    base_model.model.<module>.lora_A.weight        (r_p, in, k₁, …, k_d)    Conv
    base_model.model.<module>.lora_B.weight        (out, r_p, 1, …, 1)
    base_model.model.<module>.lora_magnitude_vector (out,)        DoRA (use_dora)
    base_model.model.<module>.base_layer.bias      bias of a LoRA layer (bias="all"/"lora_only")
    base_model.model.<name>                        other biases (bias="all"), modules_to_save

so ``PeftModel.from_pretrained(base_model, directory)`` reads what
``save_adapter`` writes, and ``load_adapter`` reads what PEFT's
``save_pretrained`` writes. The model may hold lora_kernels layers or loralib
ones (same layout, so a loralib model exports as it is). PEFT's scaling for a
module is ``lora_alpha / r_p`` (``/ √r_p`` with ``use_rslora``), with r_p and
lora_alpha taken from ``rank_pattern``/``alpha_pattern`` where a key matches.

How each layer maps ("exact": the same ΔW, so the same outputs up to
floating-point round-off):

* Linear, transformers Conv1D (``fan_in_fan_out``), Embedding, WrappedLinear
  (a bitsandbytes 4/8-bit base: PEFT's QLoRA keys are a Linear's): A and B as
  they are, r_p = r. Exact. A DoraLinear adds its ``lora_magnitude_vector``
  as it is and the config says ``use_dora``: every LoRA layer of the model is
  a DoRA one, or none is.
* MergedLinear(enable_lora) with G enabled groups of ``out/len(enable_lora)``
  rows: a rank r·G LoRA on the whole layer: lora_A is our A (the enabled
  groups' A stacked, r·G × in), lora_B is (out × r·G), group g's B in its rows
  and its r columns, zero elsewhere; lora_alpha becomes α·G so the scaling
  stays α/r. Exact. Loading a PEFT adapter into a MergedLinear needs that
  block layout (zero outside the blocks); an adapter trained by PEFT on the
  whole layer has no such layout and is refused (inject a Linear instead).
* Conv1d/2d/3d, groups = 1, dilation 1, padding_mode "zeros" (PEFT's LoRA
  branch has no dilation or padding mode; other convolutions are refused).
  Kernel (k₁, …, k_d), K′ = k₂⋯k_d: our A (r·k₁, in·k₁) and B (out·K′, r·k₁)
  give ΔW = (B·A).view(W's shape); PEFT's give ΔW = B·A.flatten(1).
  - saving: exact, at PEFT rank r_p = r·k₁·K′ (our ΔW is generally not of
    rank r in PEFT's view; lora_alpha scales with it, so the scaling is α/r),
    so r_p = r for a kernel of all ones, r·k₁ for Conv1d, 9·r for a 3×3
    Conv2d (r_p and α·r_p/r go to rank_pattern/alpha_pattern);
  - loading a PEFT adapter of rank r_p into a layer of rank r: exact when
    r_p = r·k₁·K′ and the adapter has the block layout saving gives (our own
    adapters come back as they were), or when r_p·K′ <= r·k₁ (B becomes
    B_p ⊗ I_K′ and A the rows of A_p, zero-padded): every Conv1d, Conv2d with
    k₂ <= k₁ when r = r_p. Anything else is refused, naming the rank needed.
    ``load_adapter`` injecting into a plain model picks that rank itself.

Loading checks every key first: a key for a module that is not a LoRA layer,
a tensor of the wrong shape (the error names the key, the shape received and
the one expected), a MergedLinear block layout that does not hold, a LoRA layer
of the model the adapter lacks (``strict``): then nothing is changed. The
layer's ``lora_alpha`` and ``scaling`` take the adapter's values (use_rslora
adapters get scaling α/√r_p), merged layers are unmerged and merged again
around the copy, and biases and modules_to_save tensors are copied into the
model's own parameters. A ``use_dora`` adapter loads into DoraLinear layers
(``load_adapter`` injecting the layers itself makes them so), a plain one
into the others. Refused: adapters for other PEFT methods, lora_bias, and
other options that change the layer's forward.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import distributed
from .inject import (CONFIG_ATTR, InjectSummary, _inject, candidate_modules, is_lora_layer,
                     matches, pattern_key)
from .utils import _check_bias
from .wrapped import WrappedLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"

# peft.LoraConfig(...).to_dict() in PEFT 0.21.2, as PeftModel.save_pretrained writes it.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None,
    "target_modules": None, "target_parameters": None, "task_type": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Options that change what the layer computes or which weights exist: refused when set.
_UNSUPPORTED = ("lora_bias", "use_qalora", "alora_invocation_tokens",
                "arrow_config", "use_bdlora", "layer_replication", "target_parameters",
                "trainable_token_indices", "megatron_config", "velora_config",
                "monteclora_config", "kasa_config")
# Only matter when load_adapter injects the layers itself.
_INJECT_ONLY = ("layers_to_transform", "layers_pattern")


class AdapterError(ValueError):
    """An adapter that does not fit the model; nothing was changed."""


# -- one LoRA layer, seen from PEFT ------------------------------------------------------

class _Layer:
    """A LoRA layer (lora_kernels or loralib) and its mapping to PEFT's tensors."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.m = name, module
        if hasattr(module, "enable_lora"):
            self.kind = "merged"
        elif isinstance(module, nn.Embedding):
            self.kind = "embedding"
        elif isinstance(module, (nn.Linear, WrappedLinear)):
            self.kind = "linear"
        elif isinstance(getattr(module, "conv", None), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            self.kind = "conv"
        else:
            raise AdapterError(f"{name}: a LoRA layer of type {type(module).__name__}, which "
                               f"has no PEFT form here")
        self.r = module.r
        self.dora = isinstance(getattr(module, "lora_magnitude_vector", None), torch.Tensor)
        self.magnitude_key = PREFIX + f"{name}.lora_magnitude_vector"
        a, b = "lora_embedding_A", "lora_embedding_B"
        self.keys = ((PREFIX + f"{name}.{a}", PREFIX + f"{name}.{b}") if self.kind == "embedding"
                     else (PREFIX + f"{name}.lora_A.weight", PREFIX + f"{name}.lora_B.weight"))

    # conv geometry: W (out, in, k1, ..., kd); our A (r·k1, in·k1), B (out·K', r·k1)
    def _conv_geometry(self):
        conv = self.m.conv
        why = []
        if conv.groups != 1:
            why.append(f"groups={conv.groups}")
        if any(d != 1 for d in conv.dilation):
            why.append(f"dilation={conv.dilation}")
        if conv.padding_mode != "zeros":
            why.append(f"padding_mode={conv.padding_mode!r}")
        if why:
            raise AdapterError(f"{self.name}: a convolution with {', '.join(why)} has no exact "
                               f"PEFT form (PEFT's LoRA branch is a plain convolution); "
                               f"expected groups=1, dilation 1, padding_mode 'zeros'")
        out, cin, *k = conv.weight.shape
        k1, kp = k[0], math.prod(k[1:])
        a, b = self.m.lora_A, self.m.lora_B
        if tuple(a.shape) != (self.r * k1, cin * k1) or tuple(b.shape) != (out * kp, self.r * k1):
            raise AdapterError(f"{self.name}: lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)} are not in the layout (r·k₁, in·k₁), "
                               f"(out·k₂⋯k_d, r·k₁) for weight {tuple(conv.weight.shape)}")
        return out, cin, tuple(k), k1, kp

    def _merged_geometry(self):
        groups = [i for i, on in enumerate(self.m.enable_lora) if on]
        size = self.m.out_features // len(self.m.enable_lora)
        return groups, size

    def check(self) -> None:
        """Raise now if this layer cannot be saved or loaded."""
        if self.kind == "conv":
            self._conv_geometry()

    def export(self) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(PEFT's A, PEFT's B, r_p / r)."""
        a = distributed.full(self.m.lora_A.detach())  # whole tensors (FSDP2)
        b = distributed.full(self.m.lora_B.detach())
        if self.kind in ("linear", "embedding"):
            return a, b, 1
        if self.kind == "merged":
            groups, size = self._merged_geometry()
            r = self.r
            bp = b.new_zeros(self.m.out_features, r * len(groups))
            for e, g in enumerate(groups):
                bp[g * size:(g + 1) * size, e * r:(e + 1) * r] = b[e * size:(e + 1) * size]
            return a, bp, len(groups)
        out, cin, k, k1, kp = self._conv_geometry()
        rk = self.r * k1
        # j = s·K' + q: B_p[o, j] = B[o·K' + q, s]; A_p[j] is A[s] in kernel row block q.
        bp = b.view(out, kp, rk).permute(0, 2, 1).reshape(out, rk * kp)
        ap = a.new_zeros(rk, kp, kp, cin * k1)
        for q in range(kp):
            ap[:, q, q, :] = a
        return (ap.reshape(rk * kp, cin, *k), bp.reshape(out, rk * kp, *([1] * len(k))),
                k1 * kp)

    def expected(self, rp: int) -> Tuple[tuple, tuple]:
        """The shapes PEFT's A and B must have at rank rp."""
        m = self.m
        if self.kind == "embedding":
            return (rp, m.num_embeddings), (m.embedding_dim, rp)
        if self.kind in ("linear", "merged"):
            return (rp, m.lora_A.shape[1]), (m.out_features, rp)
        out, cin, k, _, _ = self._conv_geometry()
        return (rp, cin, *k), (out, rp, *([1] * len(k)))

    def natural_rank(self) -> int:
        """The PEFT rank whose tensors map onto this layer one to one."""
        if self.kind in ("linear", "embedding"):
            return self.r
        if self.kind == "merged":
            return self.r * len(self._merged_geometry()[0])
        _, _, _, k1, kp = self._conv_geometry()
        return self.r * k1 * kp

    def convert(self, ap: torch.Tensor, bp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Our (A, B) from PEFT's, or AdapterError saying why not."""
        ka, kb = self.keys
        rp = ap.shape[0] if ap.dim() >= 1 else -1
        ea, eb = self.expected(max(rp, 0))
        if self.kind in ("linear", "embedding", "merged"):
            ea, eb = self.expected(self.natural_rank())
        bad = [f"{key}: shape {tuple(t.shape)}, expected {e}"
               for key, t, e in ((ka, ap, ea), (kb, bp, eb)) if tuple(t.shape) != tuple(e)]
        if bad:
            raise AdapterError("; ".join(bad))
        if self.kind in ("linear", "embedding"):
            return ap, bp
        if self.kind == "merged":
            groups, size = self._merged_geometry()
            r = self.r
            mask = torch.ones_like(bp, dtype=torch.bool)
            b = bp.new_empty(size * len(groups), r)
            for e, g in enumerate(groups):
                mask[g * size:(g + 1) * size, e * r:(e + 1) * r] = False
                b[e * size:(e + 1) * size] = bp[g * size:(g + 1) * size, e * r:(e + 1) * r]
            stray = int(torch.count_nonzero(bp[mask]))
            if stray:
                raise AdapterError(
                    f"{kb}: not the block layout of MergedLinear(enable_lora="
                    f"{list(self.m.enable_lora)}): {stray} nonzero entries outside the enabled "
                    f"groups' (rows, r columns) blocks; an adapter trained on the whole layer "
                    f"loads into a Linear, not a MergedLinear")
            return ap, b
        out, cin, k, k1, kp = self._conv_geometry()
        rk = self.r * k1
        a4 = ap.reshape(rp, kp, cin * k1)         # A_p[j] as (K', in·k1) rows
        b2 = bp.reshape(out, rp)
        if rp == rk * kp:
            blocks = a4.reshape(rk, kp, kp, cin * k1)
            diag = torch.stack([blocks[:, q, q] for q in range(kp)], 1)
            off = blocks.clone()
            for q in range(kp):
                off[:, q, q] = 0
            if not torch.count_nonzero(off) and bool((diag == diag[:, :1]).all()):
                b = b2.reshape(out, rk, kp).permute(0, 2, 1).reshape(out * kp, rk)
                return diag[:, 0].contiguous(), b.contiguous()
        if rp * kp <= rk:
            a = ap.new_zeros(rk, cin * k1)
            a[:rp * kp] = a4.reshape(rp * kp, cin * k1)
            b = bp.new_zeros(out * kp, rk)
            b[:, :rp * kp] = torch.kron(b2, torch.eye(kp, dtype=bp.dtype, device=bp.device))
            return a, b
        need = -(-rp * kp // k1)
        raise AdapterError(f"{ka}: a PEFT rank {rp} convolution adapter with kernel {k} needs "
                           f"r >= {need} in lora_kernels' layout (r·k₁ >= r_p·k₂⋯k_d), and "
                           f"'{self.name}' has r={self.r}; inject it with r={need} "
                           f"(load_adapter into a model without LoRA layers does that)")


def lora_layers(model: nn.Module) -> List[_Layer]:
    """The model's LoRA layers with r > 0 (lora_kernels or loralib), by first name."""
    out = []
    for name, module in model.named_modules():
        if name and is_lora_layer(module) and getattr(module, "r", 0) > 0 \
                and isinstance(getattr(module, "lora_A", None), torch.Tensor):
            out.append(_Layer(name, module))
    return out


# -- saving --------------------------------------------------------------------------------

def _pattern_keys(names: List[str], all_names: List[str]) -> Dict[str, str]:
    """A rank_pattern/alpha_pattern key per name that matches that name alone."""
    keys = {}
    for n in names:
        key = re.escape(n)
        if any(o != n and re.match(rf"(.*\.)?({key})$", o) for o in all_names):
            key = "^" + key
        keys[n] = key
    return keys


def _choose_targets(model: nn.Module, names: List[str]):
    """target_modules that select exactly the LoRA layers, in PEFT's matching."""
    lora = set(names)
    cands = [n for n, _ in candidate_modules(model)]

    def exact(t):
        return {n for n in cands if matches(n, t)} == lora

    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    if exact(short):
        return short
    recorded = (model.__dict__.get(CONFIG_ATTR) or {}).get("target_modules")
    if recorded is not None and exact(recorded):
        return recorded if isinstance(recorded, str) else sorted(recorded)
    full = sorted(lora)
    if exact(full):
        return full
    return "(" + "|".join(re.escape(n) for n in full) + ")"


def _dropout_p(module) -> float:
    return float(getattr(getattr(module, "lora_dropout", None), "p", 0.0) or 0.0)


def _alpha_for_peft(layer: _Layer, factor: int):
    m = layer.m
    if m.lora_alpha / m.r == m.scaling:
        return m.lora_alpha * factor
    return m.scaling * m.r * factor       # e.g. after loading a use_rslora adapter


def _tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of ``t`` (a DTensor is gathered: every rank calls this)."""
    return distributed.full(t.detach()).to("cpu").contiguous().clone()


def _sharded(model: nn.Module) -> bool:
    return any(distributed.is_dtensor(p) for p in model.parameters())


def _writes(sharded: bool) -> bool:
    """Whether this process writes the files: every process of an unsharded
    model (call it where you like), rank 0 of a sharded one."""
    return not sharded or torch.distributed.get_rank() == 0


def _done_writing(sharded: bool) -> None:
    if sharded:
        torch.distributed.barrier()  # the files exist on every rank's return


def _save_peft(model: nn.Module, directory: str) -> dict:
    """A PEFT model's adapters through PEFT's ``save_pretrained``, from whole
    tensors: the adapter tensors of ``state_dict()`` (DTensors under FSDP2)
    are gathered on every rank and rank 0 writes."""
    from peft import get_peft_model_state_dict
    sd = model.state_dict()
    by_id = {id(v): k for k, v in sd.items()}
    keys = set()
    for adapter in model.peft_config:
        for k, v in get_peft_model_state_dict(model, state_dict=sd, adapter_name=adapter).items():
            if id(v) not in by_id:
                raise AdapterError(f"{k}: not a tensor of model.state_dict()")
            keys.add(by_id[id(v)])
    sharded = _sharded(model)
    whole = {k: _tensor(sd[k]) for k in sorted(keys)}
    if _writes(sharded):
        model.save_pretrained(directory, state_dict=whole)
    _done_writing(sharded)
    return model.peft_config[model.active_adapter].to_dict()


def save_adapter(model: nn.Module, directory: str, *, bias: Optional[str] = None,
                 modules_to_save: Optional[List[str]] = None,
                 base_model_name_or_path: Optional[str] = None) -> dict:
    """Write the model's LoRA layers as a PEFT LoRA adapter in ``directory``.

    ``bias`` and ``modules_to_save`` default to what ``inject`` was given
    (else "none" and none). ``target_modules`` in the config are the layers'
    last names when those select exactly the LoRA layers, else their full
    names; layers whose r or lora_alpha differ from the most common ones go to
    ``rank_pattern``/``alpha_pattern``; ``lora_dropout`` is the most common
    one. Returns the config written. Raises ``AdapterError`` (a ValueError)
    before writing anything when a layer has no exact PEFT form.

    A ``peft.PeftModel`` is saved by its own ``save_pretrained``. Under FSDP2
    (DTensor parameters) call it on every rank: the adapter tensors are
    gathered whole and rank 0 writes; an unsharded model is written by every
    process that calls it.
    """
    if hasattr(model, "peft_config") and hasattr(model, "save_pretrained"):
        return _save_peft(model, directory)
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("model: has no LoRA layer with r > 0 to save (inject() first)")
    recorded = model.__dict__.get(CONFIG_ATTR) or {}
    bias = bias if bias is not None else recorded.get("bias", "none")
    _check_bias(bias)
    if modules_to_save is None:
        modules_to_save = recorded.get("modules_to_save")
    for layer in layers:
        layer.check()

    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, Tuple[int, object]] = {}
    dora = {layer.dora for layer in layers}
    if len(dora) > 1:
        raise AdapterError("model: mixes DoRA and plain LoRA layers, which one PEFT adapter "
                           "cannot hold (its use_dora is for every layer); expected all "
                           f"or none, DoRA: {[la.name for la in layers if la.dora][:5]}")
    for layer in layers:
        ap, bp, factor = layer.export()
        tensors[layer.keys[0]], tensors[layer.keys[1]] = _tensor(ap), _tensor(bp)
        if layer.dora:
            tensors[layer.magnitude_key] = _tensor(
                distributed.full(layer.m.lora_magnitude_vector.detach()))
        ranks[layer.name] = (layer.r * factor, _alpha_for_peft(layer, factor))

    by_name = {layer.name: layer for layer in layers}
    if bias != "none":
        for pname, p in model.named_parameters():
            owner = next((n for n in by_name if pname.startswith(n + ".")), None)
            if owner is not None:
                rest = pname[len(owner) + 1:]
                if rest in ("bias", "conv.bias", "base_layer.bias"):
                    tensors[PREFIX + f"{owner}.base_layer.bias"] = _tensor(p)
            elif bias == "all" and "bias" in pname.rsplit(".", 1)[-1]:
                tensors[PREFIX + pname] = _tensor(p)
    if modules_to_save:
        mods = dict(candidate_modules(model))
        for target in modules_to_save:
            found = [n for n in mods if n.endswith(target)]
            if not found:
                raise AdapterError(f"modules_to_save: {target!r} matches no module of the model")
            for n in found:
                if any(is_lora_layer(s) for s in mods[n].modules()):
                    raise AdapterError(f"modules_to_save: {n!r} holds LoRA layers")
                for k, t in mods[n].state_dict().items():
                    tensors[PREFIX + f"{n}.{k}"] = _tensor(t)

    (r, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    names = [layer.name for layer in layers]
    keys = _pattern_keys(names, names)
    rank_pattern = {keys[n]: rr for n, (rr, _) in ranks.items() if rr != r}
    alpha_pattern = {keys[n]: aa for n, (_, aa) in ranks.items() if aa != alpha}
    for n, (rr, aa) in ranks.items():     # PEFT's resolution gives back every layer's values
        kr, ka = pattern_key(rank_pattern, n), pattern_key(alpha_pattern, n)
        assert (rank_pattern[kr] if kr else r, alpha_pattern[ka] if ka else alpha) == (rr, aa)
    linear = [layer.m for layer in layers if layer.kind in ("linear", "merged")]
    drops = Counter(_dropout_p(layer.m) for layer in layers if layer.kind != "embedding")

    config = dict(_PEFT_DEFAULTS)
    config.update(
        r=r, lora_alpha=alpha, target_modules=_choose_targets(model, names),
        lora_dropout=drops.most_common(1)[0][0] if drops else 0.0,
        fan_in_fan_out=bool(linear) and all(getattr(m, "fan_in_fan_out", False)
                                            for m in linear),
        bias=bias, modules_to_save=list(modules_to_save) if modules_to_save else None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=dora == {True},
        base_model_name_or_path=base_model_name_or_path)

    sharded = _sharded(model)
    if _writes(sharded):
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True))
    _done_writing(sharded)
    return config


# -- loading -------------------------------------------------------------------------------

@dataclass
class LoadedAdapter:
    """What ``load_adapter`` did."""

    config: dict
    layers: List[str] = field(default_factory=list)     # LoRA layers loaded
    tensors: List[str] = field(default_factory=list)    # other parameters/buffers loaded
    injected: Optional[InjectSummary] = None            # when it injected the layers itself


_LORA_SUFFIXES = ((".lora_A.weight", 0), (".lora_B.weight", 1),
                  (".lora_embedding_A", 0), (".lora_embedding_B", 1))
_MAGNITUDE = ".lora_magnitude_vector"


def _read(directory: str):
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"directory: {directory!r} has no {CONFIG_NAME}")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{CONFIG_NAME}: peft_type is {config.get('peft_type')!r}, "
                           f"expected 'LORA'")
    set_ = [k for k in _UNSUPPORTED if config.get(k)]
    if set_:
        raise AdapterError(f"{CONFIG_NAME}: {', '.join(f'{k}={config[k]!r}' for k in set_)}: "
                           f"not supported by lora_kernels' layers (expected unset)")
    wpath = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(wpath):
        from safetensors.torch import load_file
        state = load_file(wpath)
    elif os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        state = torch.load(os.path.join(directory, "adapter_model.bin"), map_location="cpu",
                           weights_only=True)
    else:
        raise AdapterError(f"directory: {directory!r} has no {WEIGHTS_NAME}")
    lora: Dict[str, List] = {}
    other: Dict[str, Tuple[str, torch.Tensor]] = {}
    magnitudes: Dict[str, Tuple[str, torch.Tensor]] = {}
    for key, t in state.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{key}: expected keys starting with {PREFIX!r} (PEFT's format)")
        path = key[len(PREFIX):]
        if path.endswith(_MAGNITUDE) and config.get("use_dora"):
            magnitudes[path[:-len(_MAGNITUDE)]] = (key, t)
            continue
        for suffix, slot in _LORA_SUFFIXES:
            if path.endswith(suffix):
                entry = lora.setdefault(path[:-len(suffix)], [None, None, suffix])
                entry[slot] = (key, t)
                break
        else:
            if "lora_" in path:
                raise AdapterError(f"{key}: not a LoRA A/B tensor lora_kernels can load "
                                   f"(LoRA biases are not supported)")
            other[path] = (key, t)
    return config, lora, other, magnitudes


def _conv_rank_overrides(model: nn.Module, config: dict, lora) -> Dict[str, int]:
    """Ranks for plain convolutions whose PEFT adapter needs more than r_p (see above)."""
    mods = dict(model.named_modules())
    out = {}
    for path, (a, _b, _) in lora.items():
        conv = mods.get(path)
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or a is None:
            continue
        k = conv.weight.shape[2:]
        rp, kp = a[1].shape[0], math.prod(k[1:])
        key = pattern_key(config.get("rank_pattern") or {}, path)
        r = (config.get("rank_pattern") or {})[key] if key else config.get("r", 8)
        need = max(r, -(-rp * kp // k[0]))
        if need != r:
            out["^" + re.escape(path)] = need
    return out


def load_adapter(model: nn.Module, directory: str, *, strict: bool = True,
                 auto_inject: bool = True) -> LoadedAdapter:
    """Load a PEFT LoRA adapter (``save_pretrained`` or ``save_adapter``) into ``model``.

    The model holds LoRA layers (``inject``, or lora_kernels/loralib layers
    built by hand) at the adapter's module names; a model with none gets them
    from the adapter's config first (``inject`` with its target_modules, r,
    lora_alpha, patterns, bias, modules_to_save) when ``auto_inject``. With
    ``strict``, a LoRA layer of the model that the adapter does not cover is
    an error. On any error (``AdapterError``, a ValueError) the model is left
    as it was, layers injected here included.
    """
    config, lora, other, magnitudes = _read(directory)
    injected, undo = None, None
    if not lora_layers(model):
        if not auto_inject:
            raise AdapterError("model: has no LoRA layer (inject() first, or auto_inject=True)")
        set_ = [k for k in _INJECT_ONLY if config.get(k) is not None]
        if set_:
            raise AdapterError(f"{CONFIG_NAME}: {', '.join(set_)} set: inject the layers "
                               f"yourself, then load_adapter")
        rank_pattern = _conv_rank_overrides(model, config, lora)
        rank_pattern.update(config.get("rank_pattern") or {})
        try:
            injected, undo = _inject(
                model, target_modules=config.get("target_modules"), r=config.get("r", 8),
                lora_alpha=config.get("lora_alpha", 8),
                lora_dropout=config.get("lora_dropout", 0.0) or 0.0, fan_in_fan_out=None,
                bias=config.get("bias", "none"), modules_to_save=config.get("modules_to_save"),
                rank_pattern=rank_pattern, alpha_pattern=config.get("alpha_pattern") or None,
                exclude_modules=config.get("exclude_modules"), merge_weights=None,
                use_dora=bool(config.get("use_dora")))
        except ValueError as e:
            raise AdapterError(f"injecting the adapter's layers: {e}") from e
    try:
        result = _load(model, config, lora, other, magnitudes, strict)
    except BaseException:
        if undo is not None:
            undo()
        raise
    result.injected = injected
    return result


def _load(model, config, lora, other, magnitudes, strict) -> LoadedAdapter:
    layers = {layer.name: layer for layer in lora_layers(model)}
    modules = dict(model.named_modules())
    errors: List[str] = []
    plan = []               # (layer, A, B, lora_alpha, scaling, DoRA magnitude or None)
    errors += [f"{key}: a DoRA magnitude for '{path}', which has no lora_A/lora_B in the adapter"
               for path, (key, _) in magnitudes.items() if path not in lora]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    for path, (ta, tb, suffix) in lora.items():
        if ta is None or tb is None:
            errors.append(f"{PREFIX}{path}: has {'B' if ta is None else 'A'} but no "
                          f"{'A' if ta is None else 'B'}")
            continue
        layer = layers.get(path)
        if layer is None:
            what = (f"a {type(modules[path]).__name__}, not a LoRA layer" if path in modules
                    else "no such module in the model")
            errors.append(f"{ta[0]}: '{path}' is {what}")
            continue
        if ta[0] != layer.keys[0]:
            errors.append(f"{ta[0]}: '{path}' is a {layer.kind} LoRA layer, expected key "
                          f"{layer.keys[0]}")
            continue
        if getattr(layer.m, "merged", False) and not hasattr(layer.m, "_apply_delta"):
            errors.append(f"{ta[0]}: the loralib layer '{path}' is merged; call model.train() "
                          f"first")
            continue
        try:
            layer.check()
            a, b = layer.convert(ta[1], tb[1])
        except AdapterError as e:
            errors.append(str(e))
            continue
        magnitude = None
        if layer.dora != bool(config.get("use_dora")):
            errors.append(f"{ta[0]}: '{path}' is a {'DoRA' if layer.dora else 'plain LoRA'} "
                          f"layer and {CONFIG_NAME} has use_dora={config.get('use_dora')!r}; "
                          f"expected use_dora={layer.dora}")
            continue
        if layer.dora:
            found = magnitudes.get(path)
            want = (layer.m.out_features,)
            if found is None:
                errors.append(f"{layer.magnitude_key}: missing (a DoRA adapter has one per "
                              f"layer)")
                continue
            if tuple(found[1].shape) != want:
                errors.append(f"{found[0]}: shape {tuple(found[1].shape)}, expected {want}")
                continue
            magnitude = found[1]
        rp = ta[1].shape[0]
        key = pattern_key(rank_pattern, path)
        r_cfg = rank_pattern[key] if key else config.get("r", 8)
        if r_cfg != rp:
            errors.append(f"{ta[0]}: rank {rp}, but {CONFIG_NAME} gives r={r_cfg} for '{path}'")
            continue
        key = pattern_key(alpha_pattern, path)
        alpha_p = alpha_pattern[key] if key else config.get("lora_alpha", 8)
        scaling = alpha_p / math.sqrt(rp) if rslora else alpha_p / rp
        r = layer.r
        alpha = alpha_p * r // rp if not rslora and (alpha_p * r) % rp == 0 else scaling * r
        if alpha / r != scaling:
            alpha = scaling * r
        plan.append((layer, a, b, alpha, scaling, magnitude))
    if strict:
        missing = [n for n in layers if n not in lora]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            errors.append(f"the adapter has no tensors for the model's LoRA layers "
                          f"{', '.join(map(repr, missing[:5]))}{more} (strict=False loads "
                          f"the others)")

    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    copies = []             # (our name, tensor)
    for path, (key, t) in other.items():
        target = path
        if ".base_layer." in path:
            owner, _, rest = path.partition(".base_layer.")
            if owner in layers and not isinstance(layers[owner].m, WrappedLinear):
                target = (f"{owner}.conv.{rest}" if layers[owner].kind == "conv"
                          else f"{owner}.{rest}")
        else:
            owner, _, rest = path.rpartition(".")
            if owner in layers and layers[owner].kind == "conv":
                target = f"{owner}.conv.{rest}"
        if target not in own:
            errors.append(f"{key}: the model has no parameter or buffer '{target}'")
            continue
        owner = next((n for n in layers if target.startswith(n + ".")), None)
        if owner is not None and not target.endswith("bias"):
            errors.append(f"{key}: would overwrite the weight of LoRA layer '{owner}'")
            continue
        if tuple(t.shape) != tuple(own[target].shape):
            errors.append(f"{key}: shape {tuple(t.shape)}, expected "
                          f"{tuple(own[target].shape)}")
            continue
        copies.append((target, t))
    if errors:
        raise AdapterError("load_adapter: nothing was loaded:\n  " + "\n  ".join(errors))

    with torch.no_grad():
        for layer, a, b, alpha, scaling, magnitude in plan:
            m = layer.m
            remerge = getattr(m, "merged", False)
            if remerge:
                m._apply_delta(-1)
            distributed.copy_full_(m.lora_A, a)  # each rank's block (FSDP2)
            distributed.copy_full_(m.lora_B, b)
            if magnitude is not None:
                distributed.copy_full_(m.lora_magnitude_vector, magnitude)
            m.lora_alpha, m.scaling = alpha, scaling
            if remerge:
                m._apply_delta(+1)
        for target, t in copies:
            distributed.copy_full_(own[target], t)
    # What the model now holds, for save_adapter: the adapter's biases and modules_to_save.
    record = dict(model.__dict__.get(CONFIG_ATTR) or {"target_modules": None})
    if config.get("bias", "none") != "none":
        record["bias"] = config["bias"]
    saved = set(record.get("modules_to_save") or []) | set(config.get("modules_to_save") or [])
    record["modules_to_save"] = sorted(saved) or None
    model.__dict__[CONFIG_ATTR] = record
    return LoadedAdapter(config=config, layers=[p[0].name for p in plan],
                         tensors=[c[0] for c in copies])
