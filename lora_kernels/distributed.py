"""LoRA under torch.distributed: sharded (DTensor) weights and FSDP2.

Merging on shards. FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps
every parameter as a DTensor sharded on dim 0 outside forward, so
``model.eval()`` (which merges ΔW = B·A into W) and ``model.train()`` (which
takes it out again) call ``lora_kernels::merge_``/``unmerge_`` on DTensors.
``register`` gives those ops a rule for DTensor arguments
(``register_torch_dispatch``, torch.library's extension point for tensor
subclasses) that updates each rank's own block of W, without gathering W:

* A (r×in) and B (out×r) are gathered whole (``full_tensor()``: an
  all-gather of r·(in + out) elements, small next to W);
* each rank takes the rows and columns of W it holds (any mix of ``Shard``
  and ``Replicate`` over the mesh; the block's offset from the DTensor's
  layout) and adds the matching block of ΔW: output rows [o, o + n) need B's
  rows [o, o + n), input columns [c, c + m) need A's columns [c, c + m). That
  is one ordinary ``merge_`` of the local block with a slice of A and of B,
  so every backend's merge kernel does the work, in place, with no W-sized
  temporary;
* ``fan_in_fan_out`` W is (in, out): FSDP2's dim-0 shard holds input
  features, so it takes A's column slice and all of B;
* MergedLinear's groups: when W's output features are split, a shard may
  cut a group in two, so B is first spread over the output features
  (out × r·G: group g's B in its rows and its r columns, zero elsewhere) and
  the shard's rows of that are merged as a single group.

Each rank's block ends up exactly as merging the gathered W would leave it.

FSDP2's unsharded state. FSDP2 leaves some parameters unsharded after a
forward: the root module's (it would only gather them again for backward)
and those of modules with ``reshard_after_forward=False`` (a common setting
for evaluation). They are then plain tensors gathered from the shards, and a
merge into them would be lost at the next reshard, silently.
``reshard_for_update`` puts FSDP2's modules back in the sharded state first
(``FSDPModule.reshard()``, no communication), so a merge always reaches the
shards that the next all-gather reads.

Whole tensors. ``full`` gathers a DTensor (a collective: every rank calls
it, in the same order); ``copy_full_`` and ``init_full_`` write a whole
tensor's values into each rank's block, the latter after drawing the whole
tensor with an ``nn.init`` function on every rank, so with the same seed on
every rank the result is the single-process one (DTensor's own random ops on
a CPU mesh give every shard the same values).
"""
from __future__ import annotations

import sys
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

_REGISTERED = False


def _dtensor_loaded() -> bool:
    return "torch.distributed.tensor" in sys.modules


def register() -> None:
    """Register the DTensor rule of merge_/unmerge_ once ``torch.distributed.tensor``
    has been imported (a program with DTensors has imported it; one without
    them does not pay for importing it)."""
    global _REGISTERED
    if _REGISTERED or not _dtensor_loaded():
        return
    from torch.distributed.tensor import DTensor

    from . import ops
    for op in (ops.merge_, ops.unmerge_):
        op.register_torch_dispatch(DTensor, _merge_on_shards)
    _REGISTERED = True


def is_dtensor(t) -> bool:
    if not _dtensor_loaded():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """``t`` whole: a DTensor is gathered on every rank (collective), any
    other tensor is returned as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def local_block(t: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
    """(this rank's block of ``t``, the block's offset in the whole tensor);
    a plain tensor is its own block, at offset 0."""
    if not is_dtensor(t):
        return t, (0,) * t.dim()
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    for p in t.placements:
        if type(p) not in (Shard, Replicate):
            raise ValueError(
                f"placements: got {tuple(t.placements)}, expected Shard and Replicate "
                "placements only (each rank must hold a block of the whole tensor)")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):  # pragma: no cover - DTensor invariant
        raise RuntimeError(f"local shard of shape {tuple(local.shape)}, expected {shape}")
    return local, tuple(int(o) for o in offset)


def _block_of(whole: Tensor, local: Tensor, offset: Sequence[int]) -> Tensor:
    return whole[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))]


@torch.no_grad()
def copy_full_(param: Tensor, whole: Tensor) -> None:
    """``param`` (plain or DTensor) takes the values of the whole tensor
    ``whole`` (each rank copies its own block; no communication)."""
    if tuple(whole.shape) != tuple(param.shape):
        raise ValueError(f"whole.shape: got {tuple(whole.shape)}, expected "
                         f"{tuple(param.shape)}")
    local, offset = local_block(param)
    local.copy_(_block_of(whole, local, offset))


@torch.no_grad()
def init_full_(param: Tensor, init: Callable[[Tensor], object]) -> None:
    """``init(param)`` (an ``nn.init`` function) as on the whole tensor: a
    DTensor's whole tensor is drawn on every rank and each rank keeps its
    block, so the values do not depend on how ``param`` is sharded."""
    if not is_dtensor(param):
        init(param)
        return
    local, _ = local_block(param)
    whole = torch.empty(param.shape, dtype=param.dtype, device=local.device)
    init(whole)
    copy_full_(param, whole)


def reshard_for_update(module: nn.Module) -> None:
    """Before ``module``'s weight is updated in place: reshard the FSDP2
    modules, whose parameters may be unsharded (see the module docstring).
    Nothing to do without FSDP2, or when ``module``'s parameters are sharded."""
    if "torch.distributed.fsdp" not in sys.modules:
        return
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule
    if all(is_dtensor(p) for p in module.parameters()):
        return
    for owner in list(_module_state_mapping.keys()):
        if isinstance(owner, FSDPModule):
            owner.reshard()


# ---------------------------------------------------------------------------
# merge_ / unmerge_ on DTensors
# ---------------------------------------------------------------------------

def _spread(lora_B: Tensor, out_features: int, num_groups: int, groups: Sequence[int],
            r: int) -> Tensor:
    """B spread over the output features: (out, r·len(groups)), group
    ``groups[i]``'s B in its rows and columns i·r:(i+1)·r, zero elsewhere."""
    size = out_features // num_groups
    spread = lora_B.new_zeros(out_features, r * len(groups))
    for i, g in enumerate(groups):
        spread[g * size:(g + 1) * size, i * r:(i + 1) * r] = lora_B[i * size:(i + 1) * size]
    return spread


def _arguments(func, args, kwargs) -> List:
    names = [a.name for a in func._schema.arguments]
    return list(args) + [kwargs[n] for n in names[len(args):]]


def _as_rows(local: Tensor, offset: Sequence[int], rows: int, whole_shape):
    """A conv weight's block (n, in, k₁, …) as rows of the (rows, cols) matrix
    the merge sees: each index of dim 0 is ``rows / out`` whole rows, so a
    block of dim 0 is a block of rows (the other dims must be whole)."""
    if tuple(local.shape[1:]) != tuple(whole_shape[1:]) or rows % whole_shape[0]:
        raise ValueError(f"weight: a sharded conv weight of shape {tuple(whole_shape)} can "
                         f"be merged when sharded on dim 0 only, with lora_B's {rows} rows a "
                         f"multiple of its {whole_shape[0]} output channels (groups=1)")
    per = rows // whole_shape[0]
    return local.view(local.shape[0] * per, -1), (offset[0] * per, 0)


def _merge_on_shards(cls, func, types, args, kwargs):
    weight, lora_A, lora_B, scaling, fan_in_fan_out, num_groups, groups = \
        _arguments(func, args, kwargs)
    A, B = full(lora_A), full(lora_B)
    local, offset = local_block(weight)
    if local.numel() == 0:
        return None
    if local.dim() > 2:  # a conv weight (functional.merge_ checked the shapes)
        local, offset = _as_rows(local, offset, B.shape[0], weight.shape)
        out_features = B.shape[0]
    else:
        out_features = weight.shape[1 if fan_in_fan_out else 0]
    o0, o1 = offset
    out_dim = 1 if fan_in_fan_out else 0
    out_lo, in_lo = (o1, o0) if fan_in_fan_out else (o0, o1)
    n_out, n_in = local.shape[out_dim], local.shape[1 - out_dim]
    A_part = A[:, in_lo:in_lo + n_in]
    groups = list(groups)
    if n_out == out_features:  # the output features are whole here: B as it is
        B_part = B
    else:
        r = A.shape[0] // len(groups)
        B_part = _spread(B, out_features, num_groups, groups, r)[out_lo:out_lo + n_out]
        num_groups, groups = 1, [0]
    func(local, A_part.contiguous(), B_part.contiguous(), scaling, fan_in_fan_out, num_groups,
         groups)
    return None
