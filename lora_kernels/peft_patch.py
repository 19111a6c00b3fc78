"""Run an existing Hugging Face PEFT model's LoRA layers on the fused ops.

    report = patch_peft(model)     # model: a peft.PeftModel (or a module holding PEFT LoRA layers)
    ...train, evaluate, save_pretrained...
    unpatch_peft(model)            # PEFT's own forward again

``patch_peft`` gives every PEFT LoRA layer it can fuse (``peft.tuners.lora``
Linear, Embedding, Conv1d/2d/3d, AdaLoRA's ``SVDLinear``, and the LoRA
Linear classes PEFT puts around quantized bases: bitsandbytes ``Linear4bit``
and ``Linear8bitLt``, HQQ, GPTQ, AWQ, EETQ, AQLM, torchao, INC, and their
AdaLoRA forms) a new ``forward``
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
* DoRA (``use_dora``) on a Linear or Conv1D base, one active adapter: one
  ``dora_linear`` op (``lora_kernels.dora``): the row norms of W + s·B·A
  without building it (‖W_i‖² cached on W), PEFT's math, one frozen GEMM
  with dropout off and two with it on (x and dropout(x)), the mask
  regenerated; lora_A, lora_B and lora_magnitude_vector get their gradients.
* Linear and SVDLinear around a base lora_kernels does not compute (a
  quantized layer, a custom module, a base with forward hooks): the base runs
  as its own module, as in PEFT, and one ``lora_delta`` op adds the branch to
  its output (several adapters folded as above with dropout off, one call per
  adapter with it on), in x's dtype: A and B are cast to it, x never is, also
  under autocast. Backward holds x, s and the seed: PEFT's fp32 copy of x,
  its dropped copy and the mask are never made. A base output in another
  dtype than x's gets PEFT's own branch (the base is not run twice).
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
a LoRA variant (aLoRA, …; DoRA when several adapters are active or the base
is quantized), AdaLoRA adapters of rank 0, LoRA
sub-modules with forward hooks (or embedding/conv bases with them), global
module hooks, a dropout module that is not ``nn.Dropout``/``nn.Identity``,
DTensor inputs or adapters inside forward (tensor parallelism). Never patched
(reported by ``patch_peft``): layer types whose forward is not one of PEFT's
above (MultiheadAttention, ParamWrapper, tensor-parallel layers, other
tuners, subclasses with their own forward), layers whose every adapter is a
variant, embedding or conv bases that are not the plain torch module with a
floating weight, convs with groups, dilation or non-zero padding modes,
embeddings with ``max_norm``, ``sparse``, ``scale_grad_by_freq``, an
``embed_scale`` or tensor parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch.nn as nn

from .peft_forward import _FusedForward
from .peft_layers import _kind, _peft, _static_reason


@dataclass
class PatchReport:
    """What ``patch_peft`` did: the layers running fused, those among them
    whose base runs as its own module (``around``: name → base class, e.g.
    bitsandbytes ``Linear4bit``) and those left to PEFT, each with its reason
    (layer names as in ``model.named_modules()``)."""

    patched: List[str] = field(default_factory=list)
    deferred: Dict[str, str] = field(default_factory=dict)
    around: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"patched": len(self.patched), "deferred": dict(self.deferred),
                "around": dict(self.around)}

    def __str__(self) -> str:
        total = len(self.patched) + len(self.deferred)
        head = f"lora_kernels.patch_peft: {len(self.patched)} of {total} LoRA layers fused"
        if self.around:
            counts: Dict[str, int] = {}
            for base in self.around.values():
                counts[base] = counts.get(base, 0) + 1
            bases = ", ".join(f"{n} {b}" for b, n in counts.items())
            head += f" ({bases} base layers run as their own modules)"
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
        fused = layer.__dict__.get("forward")
        if not isinstance(fused, _FusedForward):
            kind = _kind(layer)
            why = _static_reason(layer, kind)
            if why:
                report.deferred[name] = why
                continue
            fused = layer.forward = _FusedForward(layer, kind)
        report.patched.append(name)
        if fused.kind in ("linear", "svd") and not fused.gemm:
            report.around[name] = type(fused.base).__name__
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
