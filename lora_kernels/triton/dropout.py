"""``dropout(x, seed, p)``: x times its mask (Conv layers drop their input
with it). x is viewed as rows × last dim, as the mask's counter layout says."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .common import NAMESPACE, PRUNE_FIRST, configs, dropout_args
from .philox import keep_scale_tile


@triton.autotune(configs=configs([dict(BM=16, BK=256), dict(BM=32, BK=128)],
                                 dict(BM=8, BK=16)), prune_configs_by=PRUNE_FIRST, key=["n_cols"])
@triton.jit
def _dropout_kernel(x_ptr, y_ptr, seed_ptr, n_rows, n_cols, threshold,
                    BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    col0 = tl.program_id(1) * BK
    cols = col0 + tl.arange(0, BK)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    keep = keep_scale_tile(tl.load(seed_ptr), rows, col0, n_cols, threshold,
                           x_ptr.dtype.element_ty, BM, BK)
    tl.store(y_ptr + offs, (x.to(keep.dtype) * keep).to(x.dtype), mask=inside)


@triton_op(f"{NAMESPACE}::dropout", mutates_args=())
def dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    threshold, _ = dropout_args(p)
    n_cols = x.shape[-1] if x.dim() else 1
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n_rows = xc.numel() // n_cols if n_cols else 0
    if xc.numel() == 0:
        return y
    if threshold == 0:
        return y.copy_(xc)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BM"]), triton.cdiv(n_cols, meta["BK"]))

    wrap_triton(_dropout_kernel)[grid](xc, y, seed, n_rows, n_cols, threshold)
    return y
