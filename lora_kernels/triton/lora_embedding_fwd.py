"""``lora_embedding_fwd``: y = W[idx] + scaling·Aᵀ[idx]·Bᵀ, s = Aᵀ[idx].

One kernel: each (token block, column block) program gathers its rows of W
and the matching columns of A (s, tokens × r), adds scaling·s·Bᵀ and stores
y once; the first column block also stores s, which backward keeps for dB
(no tokens × dim intermediate, no ΔW).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops import lowrank_dtype
from .common import (
    NAMESPACE,
    PRUNE_FIRST,
    acc_type,
    configs,
    dot_precision,
    pow2_at_least_16,
)


@triton.autotune(configs=configs([dict(BM=64, BN=128), dict(BM=32, BN=256), dict(BM=64, BN=64)],
                                 dict(BM=16, BN=16), warps=[4, 4, 4]),
                 prune_configs_by=PRUNE_FIRST, key=["D", "R"])
@triton.jit
def _embedding_fwd_kernel(idx_ptr, w_ptr, a_ptr, b_ptr, y_ptr, s_ptr, T, D, R, scaling,
                          stride_wn, stride_wd, stride_ar, stride_an, stride_bd, stride_br,
                          ACC: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    dtype = y_ptr.dtype.element_ty
    idx = tl.load(idx_ptr + rm, mask=rm < T, other=0).to(tl.int64)
    inside = (rm[:, None] < T) & (rn[None, :] < D)
    acc = tl.load(w_ptr + idx[:, None] * stride_wn + rn[None, :] * stride_wd, mask=inside,
                  other=0.0).to(ACC)
    low = tl.zeros((BM, BN), dtype=ACC)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        s = tl.load(a_ptr + rr[None, :] * stride_ar + idx[:, None] * stride_an,
                    mask=(rm[:, None] < T) & (rr[None, :] < R), other=0.0)
        if pid_n == 0:
            tl.store(s_ptr + rm[:, None] * R + rr[None, :], s.to(s_ptr.dtype.element_ty),
                     mask=(rm[:, None] < T) & (rr[None, :] < R))
        b = tl.load(b_ptr + rn[None, :] * stride_bd + rr[:, None] * stride_br,
                    mask=(rn[None, :] < D) & (rr[:, None] < R), other=0.0)
        low = tl.dot(s, b, low, input_precision=PREC)
    acc += low * scaling
    tl.store(y_ptr + rm[:, None] * D + rn[None, :], acc.to(dtype), mask=inside)


@triton_op(f"{NAMESPACE}::lora_embedding_fwd", mutates_args=())
def lora_embedding_fwd(indices: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    T = indices.shape[0]
    D = weight.shape[1]
    R = lora_A.shape[0]
    y = weight.new_empty(T, D)
    s = weight.new_empty(T, R, dtype=lowrank_dtype(weight.dtype))
    if T == 0:
        return y, s
    if D == 0:
        return y, s.copy_(lora_A.t()[indices])
    BR = min(pow2_at_least_16(R), 64)

    def grid(meta):
        return (triton.cdiv(T, meta["BM"]), triton.cdiv(D, meta["BN"]))

    wrap_triton(_embedding_fwd_kernel)[grid](
        indices, weight, lora_A, lora_B, y, s, T, D, R, scaling,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), ACC=acc_type(weight.dtype),
        PREC=dot_precision(weight.dtype), BR=BR)
    return y, s
