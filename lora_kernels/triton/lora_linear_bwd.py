"""``lora_linear_bwd``: the gradients of y = x·Wᵀ + b + scaling·(x⊙m)·Aᵀ·Bᵀ.

With dS = scaling·g·B_full (tokens × R):

    dx = g·W + m ⊙ (dS·A)      one GEMM; the rank-R term and the regenerated
                               mask m are applied in its epilogue
    dA = dSᵀ·(x⊙m)             reduction over tokens, m applied as x loads
    dB = scaling·gᵀ·S          with dS, from one read of g (rank_r_grads.py)
    dW = gᵀ·x, db = Σ g        (frozen weight / bias: torch, only when asked)

Nothing of size tokens × in or tokens × out is made besides dx itself; the
mask is never loaded, only regenerated. Each output is computed only when
its flag in output_mask is set.
"""
from typing import List, Tuple

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
    interpreting,
    parallel_programs,
    pow2_at_least_16,
    ungroup_db,
)
from .lora_linear_fwd import _GEMM_GPU, _GEMM_INTERP, _GEMM_STAGES, _GEMM_WARPS
from .philox import keep_scale_tile
from .rank_r_grads import rank_r_grads
from .tiles import grouped_tile, lowrank_tile, matmul_tile


@triton.autotune(configs=configs(_GEMM_GPU, _GEMM_INTERP, _GEMM_WARPS, _GEMM_STAGES),
                 prune_configs_by=PRUNE_GEMM, key=["M", "N", "K", "R"])
@triton.jit
def _dx_kernel(g_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr, M, N, K, R,
               stride_gm, stride_gk, stride_wk, stride_wn, stride_dsm, stride_ar, stride_an,
               stride_dxm, threshold, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # dx (M tokens × N in-features) = g (M × K out-features) · W (K × N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    dtype = dx_ptr.dtype.element_ty
    acc = matmul_tile(g_ptr, w_ptr, rm, rn, M, N, K, stride_gm, stride_gk, stride_wk, stride_wn,
                      ACC, PREC, BM, BN, BK)
    if HAS_LORA:  # epilogue: + mask ⊙ (dS·A)
        low = lowrank_tile(ds_ptr, a_ptr, rm, rn, M, N, R, stride_dsm, stride_ar, stride_an,
                           dtype, ACC, PREC, BR, BM, BN)
        if HAS_DROPOUT:
            low = low * keep_scale_tile(tl.load(seed_ptr), rm, pid_n * BN, N, threshold,
                                        dtype, BM, BN).to(ACC)
        acc += low
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rn[None, :], acc.to(dtype),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=configs([dict(BM=64, BN=128), dict(BM=128, BN=64), dict(BM=64, BN=64)],
                                 dict(BM=16, BN=16), warps=[4, 8, 4]),
                 prune_configs_by=PRUNE_FIRST, key=["N", "R", "ROWS_PER_SPLIT"])
@triton.jit
def _da_kernel(ds_ptr, x_ptr, da_ptr, seed_ptr, M, N, R, stride_dsm, stride_xm, stride_xn,
               stride_das, R_PAD, ROWS_PER_SPLIT, threshold, HAS_DROPOUT: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr):
    # dA partial (R × N in-features) of one split of the tokens = dSᵀ · (x ⊙ mask)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.program_id(2) * BR + tl.arange(0, BR)  # this program's block of ranks
    dtype = x_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BR, BN), dtype=ACC)
    m_begin = split * ROWS_PER_SPLIT  # a multiple of every config's BM
    m_end = min(m_begin + ROWS_PER_SPLIT, M)
    for m0 in range(m_begin, m_end, BM):
        rm = m0 + tl.arange(0, BM)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        if HAS_DROPOUT:
            keep = keep_scale_tile(seed, rm, pid_n * BN, N, threshold, dtype, BM, BN)
            x = (x.to(keep.dtype) * keep).to(dtype)
        ds = tl.load(ds_ptr + rm[:, None] * stride_dsm + rr[None, :],
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        acc = tl.dot(tl.trans(ds.to(dtype)), x, acc, input_precision=PREC)
    tl.store(da_ptr + split * stride_das + rr[:, None] * N + rn[None, :], acc,
             mask=(rr[:, None] < R_PAD) & (rn[None, :] < N))


def _dx(grad, weight, d_s, lora_A, seed, dropout_p, fan_in_fan_out):
    M, K = grad.shape                       # K: out features (the reduction)
    # W as (out, in) strides: fan_in_fan_out weights are (in, out) in memory.
    if fan_in_fan_out:
        N = weight.shape[0]
        stride_wk, stride_wn = weight.stride(1), weight.stride(0)
    else:
        N = weight.shape[1]
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    dx = grad.new_empty(M, N)
    if M == 0 or N == 0:
        return dx
    R = lora_A.shape[0]
    threshold, _ = dropout_args(dropout_p)
    has_lora = d_s is not None and R > 0
    BR = min(pow2_at_least_16(R), 64)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    wrap_triton(_dx_kernel)[grid](
        grad, weight, d_s if has_lora else grad, lora_A, dx, seed, M, N, K, R,
        grad.stride(0), grad.stride(1), stride_wk, stride_wn,
        d_s.stride(0) if has_lora else 0, lora_A.stride(0), lora_A.stride(1), dx.stride(0),
        threshold, HAS_LORA=has_lora, HAS_DROPOUT=has_lora and threshold > 0,
        ACC=acc_type(grad.dtype), PREC=dot_precision(grad.dtype), BR=BR)
    return dx


def _da(d_s, x, lora_A, seed, dropout_p):
    M, N = x.shape
    R = lora_A.shape[0]
    acc = lowrank_dtype(x.dtype)  # fp64 for fp64, fp32 otherwise
    if M == 0 or N == 0 or R == 0:
        return torch.zeros_like(lora_A)
    BR = min(pow2_at_least_16(R), 64)  # ranks in blocks: a third grid axis
    r_blocks = triton.cdiv(R, BR)
    R_PAD = r_blocks * BR
    threshold, _ = dropout_args(dropout_p)
    # Token splits: about parallel_programs() programs over (in blocks × splits).
    unit = 16 if interpreting() else 128    # a multiple of every config's BM
    n_blocks = triton.cdiv(N, 16 if interpreting() else 64)
    want_splits = max(1, parallel_programs(x.device) // n_blocks)
    rows = triton.cdiv(triton.cdiv(M, want_splits), unit) * unit
    splits = triton.cdiv(M, rows)
    parts = x.new_empty(splits, R_PAD, N, dtype=acc)

    def grid(meta):
        return (triton.cdiv(N, meta["BN"]), splits, r_blocks)

    wrap_triton(_da_kernel)[grid](
        d_s, x, parts, seed, M, N, R, d_s.stride(0), x.stride(0), x.stride(1), R_PAD * N, R_PAD,
        rows,
        threshold, HAS_DROPOUT=threshold > 0, ACC=acc_type(x.dtype),
        PREC=dot_precision(x.dtype), BR=BR)
    return parts.sum(0)[:R].to(lora_A.dtype).contiguous()


@triton_op(f"{NAMESPACE}::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor,
                    seed: torch.Tensor, scaling: float, dropout_p: float, fan_in_fan_out: bool,
                    num_groups: int, groups: List[int], output_mask: List[bool]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    want_x, want_w, want_b, want_a, want_bb = output_mask
    out_features = grad.shape[1]
    r = lora_A.shape[0] // max(len(groups), 1)
    b_full = grouped_b(lora_B, out_features, num_groups, groups)
    d_s, db_full = rank_r_grads(grad, s if want_bb else None, b_full, scaling,
                                want_ds=want_x or want_a, want_db=want_bb)
    dx = _dx(grad, weight, d_s, lora_A, seed, dropout_p, fan_in_fan_out) if want_x \
        else grad.new_empty(0)
    dw = weight.new_empty(0)
    if want_w:
        dw = grad.t() @ x
        dw = dw.t().contiguous() if fan_in_fan_out else dw
    db = grad.sum(0) if want_b else grad.new_empty(0)
    da = _da(d_s, x, lora_A, seed, dropout_p) if want_a else lora_A.new_empty(0)
    dB = lora_B.new_empty(0)
    if want_bb:
        dB = ungroup_db(db_full, out_features, num_groups, groups, r).to(lora_B.dtype).contiguous()
    return dx, dw, db, da, dB
