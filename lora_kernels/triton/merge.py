"""``merge_``: W += scaling·ΔW in place, ΔW = B_full·A in W's own layout
(fan_in_fan_out weights are (in, out)). Each program computes one tile of ΔW
with a rank-R dot in fp32 (fp64 for fp64 weights) and reads and writes its
tile of W once: no W-sized temporary, one rounding to W's dtype. Unmerge is
the same op with -scaling."""
from typing import List

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import NAMESPACE, PRUNE_FIRST, acc_type, configs, grouped_b, pow2_at_least_16


@triton.autotune(configs=configs([dict(BM=64, BN=128), dict(BM=128, BN=128), dict(BM=64, BN=64)],
                                 dict(BM=16, BN=16), warps=[4, 8, 4]),
                 prune_configs_by=PRUNE_FIRST, key=["M", "N", "R"])
@triton.jit
def _merge_kernel(w_ptr, b_ptr, a_ptr, M, N, R, scaling, stride_wm, stride_wn,
                  stride_bm, stride_br, stride_ar, stride_an,
                  ACC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # W[out rows rm, in cols rn] += scaling · Σ_r B[rm, r] · A[r, rn]
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    delta = tl.zeros((BM, BN), dtype=ACC)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        b = tl.load(b_ptr + rm[:, None] * stride_bm + rr[None, :] * stride_br,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rn[None, :] * stride_an,
                    mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        delta = tl.dot(b.to(ACC), a.to(ACC), delta, input_precision="ieee")
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn
    w = tl.load(ptrs, mask=inside, other=0.0)
    tl.store(ptrs, (w.to(ACC) + delta * scaling).to(w_ptr.dtype.element_ty), mask=inside)


@triton_op(f"{NAMESPACE}::merge_", mutates_args=("weight",))
def merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
           fan_in_fan_out: bool, num_groups: int, groups: List[int]) -> None:
    if fan_in_fan_out:  # W stored (in, out): address it as (out, in) by strides
        M, N = weight.shape[1], weight.shape[0]
        stride_wm, stride_wn = weight.stride(1), weight.stride(0)
    else:
        M, N = weight.shape
        stride_wm, stride_wn = weight.stride(0), weight.stride(1)
    R = lora_A.shape[0]
    if M == 0 or N == 0 or R == 0:
        return
    b_full = grouped_b(lora_B, M, num_groups, groups)
    BR = min(pow2_at_least_16(R), 64)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))

    wrap_triton(_merge_kernel)[grid](
        weight, b_full, lora_A, M, N, R, scaling, stride_wm, stride_wn,
        b_full.stride(0), b_full.stride(1), lora_A.stride(0), lora_A.stride(1),
        ACC=acc_type(weight.dtype), BR=BR)
