"""The dropout mask inside Triton kernels: Philox4x32-10 with the counter
layout of ``lora_kernels.reference`` (one call per 8 columns, 16-bit lanes),
so a kernel regenerates exactly the CPU backend's mask for any tile."""
import triton
import triton.language as tl


@triton.jit
def keep_scale_tile(seed, rows, col0, n_cols, threshold, DTYPE: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr):
    """[BM, BK] multipliers (keep scale or 0) for rows ``rows`` (a [BM]
    vector) and columns col0 .. col0 + BK of a matrix with n_cols columns.

    col0 and BK are multiples of 8, so the tile owns whole counters: counter
    n = row · ceil(n_cols / 8) + col // 8, one Philox call per counter, lanes
    lo(o0), hi(o0), lo(o1), ... for its 8 columns. The keep scale
    2¹⁶ / (2¹⁶ − threshold) is rounded as the reference rounds it for x's
    dtype DTYPE (fp64 division, then to fp32, then to DTYPE); the tile is fp64
    for fp64 x and fp32 otherwise, so ``(x.to(acc) * tile).to(DTYPE)`` equals
    the reference's ``x * mask`` bit for bit.
    """
    W: tl.constexpr = BK // 8
    words = (n_cols + 7) // 8
    n = rows.to(tl.int64)[:, None] * words + (col0 // 8 + tl.arange(0, W))[None, :]
    lo = (n & 0xFFFFFFFF).to(tl.uint32)
    hi = (n >> 32).to(tl.uint32)
    zero = lo * 0
    o0, o1, o2, o3 = tl.philox(seed, lo, hi, zero, zero, 10)
    words4 = tl.join(tl.join(o0, o1), tl.join(o2, o3))       # [BM, W, 2, 2]: o[2·b + a] at [a, b]
    halves = tl.join(words4 & 0xFFFF, words4 >> 16)          # [BM, W, a, b, half]
    lanes = tl.reshape(tl.permute(halves, (0, 1, 3, 2, 4)), (BM, BK))  # lane 4b + 2a + half
    # threshold 65536 (p = 1) keeps nothing: its scale is never used, and the
    # divisor is moved off zero.
    divisor = 65536 - threshold + 65535 * (threshold >= 65536)
    scale = tl.full([], 65536.0, tl.float64) / tl.full([], divisor, tl.float64)
    if DTYPE == tl.float64:
        keep = scale
    else:
        keep = scale.to(tl.float32).to(DTYPE).to(tl.float32)
    return tl.where(lanes >= threshold, keep, 0.0)
