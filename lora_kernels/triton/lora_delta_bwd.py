"""``lora_delta_bwd``: the gradients of ``lora_delta_fwd``'s branch (base's
gradient is g itself, passed on by the autograd), from existing kernels:

    dS, dB  ``rank_r_grads``: one read of g, fixed-order partials;
    dA      ``lora_linear_bwd._da``: dSᵀ·(x ⊙ m), the mask applied as x loads;
    dx      ``lora_linear_bwd._dx`` with an empty frozen GEMM (no W): its
            epilogue m ⊙ (dS·A) alone, the mask regenerated, written once.
"""
from typing import List, Tuple

import torch
from torch.library import triton_op

from .common import NAMESPACE, grouped_b, ungroup_db
from .lora_linear_bwd import _da, _dx
from .rank_r_grads import rank_r_grads


@triton_op(f"{NAMESPACE}::lora_delta_bwd", mutates_args=())
def lora_delta_bwd(grad: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, s: torch.Tensor, seed: torch.Tensor, scaling: float,
                   dropout_p: float, num_groups: int, groups: List[int], output_mask: List[bool]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    want_x, want_a, want_bb = output_mask
    out_features = grad.shape[1]
    in_features = lora_A.shape[1]
    r = lora_A.shape[0] // max(len(groups), 1)
    b_full = grouped_b(lora_B, out_features, num_groups, groups)
    d_s, db_full = rank_r_grads(grad, s if want_bb else None, b_full, scaling,
                                want_ds=want_x or want_a, want_db=want_bb)
    dx = grad.new_empty(0)
    if want_x:
        no_weight = grad.new_empty(0, in_features)  # a frozen GEMM of K = 0
        dx = _dx(grad[:, :0], no_weight, d_s, lora_A, seed, dropout_p, False)
    da = _da(d_s, x, lora_A, seed, dropout_p) if want_a else lora_A.new_empty(0)
    dB = lora_B.new_empty(0)
    if want_bb:
        dB = ungroup_db(db_full, out_features, num_groups, groups, r).to(lora_B.dtype).contiguous()
    return dx, da, dB
