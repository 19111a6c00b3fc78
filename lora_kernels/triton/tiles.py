"""Tile helpers shared by the Triton GEMM kernels (inlined by the compiler)."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped launch order: GROUP_M row
    blocks run next to each other on every column block, so a column block of
    the weight is reused from L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def matmul_tile(a_ptr, b_ptr, rm, rn, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr):
    """Σ_k a[rm, k] · b[k, rn] over k < K, as a [BM, BN] ACC tile (any strides)."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def lowrank_tile(s_ptr, b_ptr, rm, rn, M, N, R, stride_sm, stride_br, stride_bn,
                 DTYPE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    """Σ_r s[rm, r] · b[r, rn] for the rank-R epilogues (s is the tokens×R
    product kept in fp32 for half inputs, rounded to DTYPE for the dot)."""
    low = tl.zeros((BM, BN), dtype=ACC)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :],
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                    mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        low = tl.dot(s.to(DTYPE), b, low, input_precision=PREC)
    return low
