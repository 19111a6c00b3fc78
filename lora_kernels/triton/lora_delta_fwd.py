"""``lora_delta_fwd``: y = base + scaling·(dropout(x)·Aᵀ)·Bᵀ, the LoRA branch
around a base layer computed elsewhere (whose output is ``base``).

Two existing kernels, no new math:

1. ``lora_linear_fwd.lowrank_in``: S = dropout(x)·Aᵀ (tokens × r·G) in one
   pass over x, the mask regenerated from Philox per tile, never stored.
   S is returned for backward.
2. ``merge._merge_kernel``: the rank-R update of a matrix in place, here
   y (tokens × out) += scaling · S·B_fullᵀ, with y starting as a copy of
   base; fp32 accumulation (fp64 for fp64), one rounding to y's dtype.
"""
from typing import List, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from .common import NAMESPACE, acc_type, grouped_b, pow2_at_least_16
from .lora_linear_fwd import lowrank_in
from .merge import _merge_kernel


@triton_op(f"{NAMESPACE}::lora_delta_fwd", mutates_args=())
def lora_delta_fwd(x: torch.Tensor, base: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, seed: torch.Tensor, scaling: float, dropout_p: float,
                   num_groups: int, groups: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    s = lowrank_in(x, lora_A, seed, dropout_p)
    y = base.clone(memory_format=torch.contiguous_format)
    M, N = y.shape
    R = lora_A.shape[0]
    if M == 0 or N == 0 or R == 0:
        return y, s
    b_full = grouped_b(lora_B, N, num_groups, groups)  # (out, R)
    BR = min(pow2_at_least_16(R), 64)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))

    # y[t, o] += scaling · Σ_r S[t, r] · B_full[o, r]: the merge kernel with
    # W = y, its B = S (tokens × R) and its A = B_fullᵀ (R × out, by strides).
    wrap_triton(_merge_kernel)[grid](
        y, s, b_full, M, N, R, scaling, y.stride(0), y.stride(1),
        s.stride(0), s.stride(1), b_full.stride(1), b_full.stride(0),
        ACC=acc_type(y.dtype), BR=BR)
    return y, s
