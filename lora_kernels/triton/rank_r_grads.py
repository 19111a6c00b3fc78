"""dS and dB of a rank-r branch from one read of the incoming gradient g
(shared by the Linear and Embedding backward ops):

    dS = scaling · g·B_full        (tokens × R)   — needed by dx and dA
    dB = scaling · gᵀ·S            (out × R)

Both reduce g over a different axis, so one kernel reading each g tile once
must leave one of them partial. The grid is (column chunks of g) × (row
slots): a program walks its slot's row blocks over its column chunk, adds
each g tile's contribution to dB into its own private (chunk, slot) region
(load-add-store in fixed row order; no atomics) and writes dS partial sums
per column chunk. The host sums the few partials (column chunks for dS, row
slots for dB) with torch, in a fixed order: results are deterministic.
Partial sizes: chunks × tokens × R and slots × out × R, in fp32, with the
grid shaped to make their sum small (≈ 12 MB at tokens 8192, out 4096, r 16,
against 64 MB of bf16 g).
"""
import math

import triton
import triton.language as tl
from torch.library import wrap_triton

from ..ops import lowrank_dtype
from .common import (
    PRUNE_FIRST,
    acc_type,
    configs,
    dot_precision,
    interpreting,
    parallel_programs,
    pow2_at_least_16,
)


@triton.autotune(configs=configs([dict(BM=64, BN=128), dict(BM=128, BN=64), dict(BM=64, BN=64)],
                                 dict(BM=16, BN=16), warps=[4, 8, 4]),
                 prune_configs_by=PRUNE_FIRST, key=["N", "R", "CHUNK_COLS"])
@triton.jit
def _rank_r_grads_kernel(g_ptr, s_ptr, b_ptr, ds_ptr, db_ptr, M, N, R, scaling,
                         stride_gm, stride_gn, stride_sm, stride_bn, stride_br,
                         stride_dsc, stride_dbs, R_PAD, CHUNK_COLS, num_slots,
                         WANT_DS: tl.constexpr, WANT_DB: tl.constexpr, ACC: tl.constexpr,
                         PREC: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr):
    chunk = tl.program_id(0)
    slot = tl.program_id(1)
    dtype = g_ptr.dtype.element_ty
    rr = tl.program_id(2) * BR + tl.arange(0, BR)  # this program's block of ranks
    n_begin = chunk * CHUNK_COLS  # a multiple of every config's BN
    n_end = min(n_begin + CHUNK_COLS, N)
    for mb in range(slot, tl.cdiv(M, BM), num_slots):
        rm = mb * BM + tl.arange(0, BM)
        if WANT_DB:
            s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :],
                        mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0).to(dtype)
        ds = tl.zeros((BM, BR), dtype=ACC)
        for n0 in range(n_begin, n_end, BN):
            rn = n0 + tl.arange(0, BN)
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                        mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            if WANT_DS:
                b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                            mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
                ds = tl.dot(g, b, ds, input_precision=PREC)
            if WANT_DB:
                part = tl.dot(tl.trans(g), s, input_precision=PREC, out_dtype=ACC) * scaling
                ptrs = db_ptr + slot * stride_dbs + rn[:, None] * R_PAD + rr[None, :]
                if mb != slot:  # not this program's first row block: accumulate
                    part += tl.load(ptrs, mask=rn[:, None] < N, other=0.0)
                tl.store(ptrs, part, mask=rn[:, None] < N)
        if WANT_DS:
            tl.store(ds_ptr + chunk * stride_dsc + rm[:, None] * R_PAD + rr[None, :], ds * scaling,
                     mask=rm[:, None] < M)


def rank_r_grads(g, s, b_full, scaling, want_ds, want_db):
    """(dS, dB_full): dS (tokens × R) in the low-rank accumulator dtype, dB_full
    (out × R) likewise; None for the one not asked for."""
    M, N = g.shape
    R = b_full.shape[1]
    acc = lowrank_dtype(g.dtype)  # fp64 for fp64, fp32 otherwise
    if not (want_ds or want_db):
        return None, None
    if M == 0 or N == 0 or R == 0:
        return (g.new_zeros(M, R, dtype=acc) if want_ds else None,
                g.new_zeros(N, R, dtype=acc) if want_db else None)
    # Ranks in blocks of at most 64 (a third grid axis; each block re-reads g,
    # which only happens for r·groups > 64).
    BR = min(pow2_at_least_16(R), 64)
    r_blocks = triton.cdiv(R, BR)
    R_PAD = r_blocks * BR
    # Grid: `chunks` column chunks × `slots` row slots ≈ 2 programs per SM.
    # The partials cost chunks·M·BR + slots·N·BR floats; for a fixed number
    # of programs that is smallest at chunks ≈ sqrt(programs·N/M).
    # Chunk widths are whole multiples of every config's BN (unit), and
    # slots never outnumber the row blocks of the largest BM (bm_max), so
    # every slot writes its dB region (no zero fill needed).
    unit, bm_max = (16, 16) if interpreting() else (128, 128)
    programs = max(1, parallel_programs(g.device) // 2)
    n_units = triton.cdiv(N, unit)
    chunks = max(1, min(n_units, round(math.sqrt(programs * N / M))))
    per_chunk_cols = triton.cdiv(n_units, chunks) * unit
    chunks = triton.cdiv(N, per_chunk_cols)
    slots = max(1, min(triton.cdiv(M, bm_max), programs // chunks))
    ds = g.new_empty(chunks, M, R_PAD, dtype=acc) if want_ds else g.new_empty(0, dtype=acc)
    db = g.new_empty(slots, N, R_PAD, dtype=acc) if want_db else g.new_empty(0, dtype=acc)

    def grid(meta):
        return (chunks, slots, r_blocks)

    wrap_triton(_rank_r_grads_kernel)[grid](
        g, s if s is not None else g, b_full, ds, db, M, N, R, scaling,
        g.stride(0), g.stride(1), s.stride(0) if s is not None else 0,
        b_full.stride(0), b_full.stride(1), M * R_PAD, N * R_PAD, R_PAD,
        per_chunk_cols, slots, WANT_DS=want_ds, WANT_DB=want_db,
        ACC=acc_type(g.dtype), PREC=dot_precision(g.dtype), BR=BR)
    d_s = ds.sum(0)[:, :R] if want_ds else None
    d_b = db.sum(0)[:, :R] if want_db else None
    return d_s, d_b
