"""``lora_linear_fwd``: y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ.

Two kernels, no tokens×out intermediate:

1. ``_lowrank_in_kernel``: S = dropout(x)·Aᵀ (tokens × r·G). One pass over
   x; the mask is regenerated from Philox per tile (never stored) and applied
   while x is in registers. S is returned: it is what backward keeps
   (tokens × r, fp32 for half inputs) instead of a dropped copy of x.
2. ``_fused_linear_kernel``: the frozen GEMM x·Wᵀ with an epilogue that adds
   scaling·S·B_fullᵀ and the bias to the accumulator before the single store
   of y. B_full is lora_B itself for a Linear, or MergedLinear's B spread
   over all output features (out × r·G, zero rows for disabled groups; see
   common.grouped_b), so a tile that straddles groups needs no branching.

Computing S inside the GEMM's K-loop would repeat it for every column block
of y (out / BN times); a separate pass costs one extra read of x instead
(tokens × in, the same size as one K-loop's stream of x).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops import lowrank_dtype
from .common import (
    NAMESPACE,
    PRUNE_FIRST,
    PRUNE_GEMM,
    acc_type,
    configs,
    dot_precision,
    dropout_args,
    grouped_b,
    pow2_at_least_16,
)
from .philox import keep_scale_tile
from .tiles import grouped_tile, lowrank_tile, matmul_tile

# Block sizes: BM tokens × BN output features × BK reduction (in features).
_GEMM_GPU = [dict(BM=128, BN=128, BK=64, GROUP_M=8), dict(BM=128, BN=256, BK=64, GROUP_M=8),
             dict(BM=256, BN=128, BK=64, GROUP_M=8), dict(BM=64, BN=128, BK=64, GROUP_M=8),
             dict(BM=128, BN=64, BK=64, GROUP_M=8), dict(BM=64, BN=64, BK=64, GROUP_M=8)]
_GEMM_WARPS = [8, 8, 8, 4, 4, 4]
_GEMM_STAGES = [4, 3, 3, 4, 4, 4]
_GEMM_INTERP = dict(BM=16, BN=16, BK=16, GROUP_M=2)


@triton.autotune(configs=configs([dict(BM=64, BK=128), dict(BM=128, BK=64), dict(BM=64, BK=64)],
                                 dict(BM=16, BK=16), warps=[4, 8, 4]),
                 prune_configs_by=PRUNE_FIRST, key=["K", "R"])
@triton.jit
def _lowrank_in_kernel(x_ptr, a_ptr, s_ptr, seed_ptr, M, K, R,
                       stride_xm, stride_xk, stride_ar, stride_ak, stride_sm,
                       threshold, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr,
                       PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
                       BK: tl.constexpr):
    # S[rows, rank block] = Σ_k (x ⊙ mask)[rows, k] · A[rank block, k]
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, BR), dtype=ACC)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            keep = keep_scale_tile(seed, rm, k0, K, threshold, x_ptr.dtype.element_ty, BM, BK)
            x = (x.to(keep.dtype) * keep).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PREC)
    tl.store(s_ptr + rm[:, None] * stride_sm + rr[None, :], acc.to(s_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.autotune(configs=configs(_GEMM_GPU, _GEMM_INTERP, _GEMM_WARPS, _GEMM_STAGES),
                 prune_configs_by=PRUNE_GEMM, key=["M", "N", "K", "R"])
@triton.jit
def _fused_linear_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, M, N, K, R, scaling,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_sm,
                         stride_bn, stride_br, stride_ym,
                         HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ACC: tl.constexpr,
                         PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    dtype = y_ptr.dtype.element_ty
    # x·Wᵀ: W (out, in) read as its transpose through the strides.
    acc = matmul_tile(x_ptr, w_ptr, rm, rn, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                      ACC, PREC, BM, BN, BK)
    if HAS_LORA:  # epilogue: + scaling · S·B_fullᵀ, rank block by rank block
        acc += scaling * lowrank_tile(s_ptr, b_ptr, rm, rn, M, N, R, stride_sm, stride_br,
                                      stride_bn, dtype, ACC, PREC, BR, BM, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(dtype),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def lowrank_in(x, lora_A, seed, dropout_p):
    """S = dropout(x)·Aᵀ (tokens × rows of A) in the low-rank dtype."""
    M, K = x.shape
    R = lora_A.shape[0]
    s = x.new_empty(M, R, dtype=lowrank_dtype(x.dtype))
    if M == 0 or R == 0:
        return s
    if K == 0:
        return s.zero_()
    threshold, _ = dropout_args(dropout_p)
    BR = min(pow2_at_least_16(R), 64)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(R, BR))

    wrap_triton(_lowrank_in_kernel)[grid](
        x, lora_A, s, seed, M, K, R, x.stride(0), x.stride(1), lora_A.stride(0),
        lora_A.stride(1), s.stride(0), threshold, HAS_DROPOUT=threshold > 0,
        ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype), BR=BR)
    return s


@triton_op(f"{NAMESPACE}::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_A: torch.Tensor, lora_B: torch.Tensor, seed: torch.Tensor,
                    scaling: float, dropout_p: float, fan_in_fan_out: bool, num_groups: int,
                    groups: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    # W as (out, in) strides: fan_in_fan_out weights are (in, out) in memory.
    if fan_in_fan_out:
        N = weight.shape[1]
        stride_wn, stride_wk = weight.stride(1), weight.stride(0)
    else:
        N = weight.shape[0]
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    s = lowrank_in(x, lora_A, seed, dropout_p)
    y = x.new_empty(M, N)
    if M == 0 or N == 0:
        return y, s
    b_full = grouped_b(lora_B, N, num_groups, groups)
    R = lora_A.shape[0]
    BR = min(pow2_at_least_16(R), 64)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    wrap_triton(_fused_linear_kernel)[grid](
        x, weight, bias if bias is not None else y, s, b_full, y, M, N, K, R, scaling,
        x.stride(0), x.stride(1), stride_wn, stride_wk, s.stride(0),
        b_full.stride(0), b_full.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=R > 0, ACC=acc_type(x.dtype),
        PREC=dot_precision(x.dtype), BR=BR)
    return y, s
